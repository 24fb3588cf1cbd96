//! The one WASI capability a policy gets: random numbers.
//!
//! Rust's `HashMap` seeds itself from `wasi:random/insecure-seed` (other
//! languages' runtimes do the like), so a policy that uses one would trap at
//! its first pick if these were stubs. Randomness grants nothing a policy
//! could not already get from `env.random`; every other WASI import stays a
//! stub that traps.

use wasmtime::component::Linker;

use super::host::HostState;

/// Longest byte string a policy may ask for at once: more would let a guest
/// make the host allocate without bound (guest memory has its own limit).
const MAX_BYTES: u64 = 64 * 1024;

/// Defines `import` (a full name such as `wasi:random/random@0.2.6`) if it
/// is a WASI 0.2 random interface; says whether it was. Defined under the
/// import's own name and version, so the trap stubs made for the rest of
/// WASI do not shadow it.
pub fn define(linker: &mut Linker<HostState>, import: &str) -> wasmtime::Result<bool> {
    let Some((interface, version)) = import.split_once('@') else {
        return Ok(false);
    };
    if !version.starts_with("0.2.") {
        return Ok(false);
    }
    let (u64_fn, bytes_fn) = match interface {
        "wasi:random/insecure-seed" => {
            linker
                .instance(import)?
                .func_wrap("insecure-seed", |_, (): ()| {
                    Ok(((rand::random::<u64>(), rand::random::<u64>()),))
                })?;
            return Ok(true);
        }
        "wasi:random/random" => ("get-random-u64", "get-random-bytes"),
        "wasi:random/insecure" => ("get-insecure-random-u64", "get-insecure-random-bytes"),
        _ => return Ok(false),
    };
    let mut instance = linker.instance(import)?;
    instance.func_wrap(u64_fn, |_, (): ()| Ok((rand::random::<u64>(),)))?;
    instance.func_wrap(bytes_fn, |_, (len,): (u64,)| {
        if len > MAX_BYTES {
            wasmtime::bail!("asked for {len} random bytes (at most {MAX_BYTES} at once)");
        }
        let mut bytes = vec![0u8; len as usize];
        rand::fill(&mut bytes[..]);
        Ok((bytes,))
    })?;
    Ok(true)
}
