//! weir-wit-c: the two steps of building a C policy that need component-model
//! tooling, done with the same crates `wit-bindgen c` and
//! `wasm-tools component new` are made of.
//!
//! ```text
//! weir-wit-c bindings  WIT_DIR WORLD OUT_DIR        # C header + glue for WORLD
//! weir-wit-c component CORE OUT                   # core module -> component
//! ```

use anyhow::{bail, Context, Result};
use std::path::Path;
use wit_component::ComponentEncoder;
use wit_parser::{Resolve, WorldId};

fn main() {
    if let Err(e) = run(&std::env::args().skip(1).collect::<Vec<_>>()) {
        eprintln!("weir-wit-c: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: &[String]) -> Result<()> {
    match args {
        [cmd, wit, world, out] if cmd == "bindings" => {
            bindings(Path::new(wit), world, Path::new(out))
        }
        [cmd, core, out] if cmd == "component" => component(Path::new(core), Path::new(out)),
        _ => {
            bail!("usage: weir-wit-c bindings WIT_DIR WORLD OUT_DIR | component CORE.wasm OUT.wasm")
        }
    }
}

fn load_world(wit: &Path, world: &str) -> Result<(Resolve, WorldId)> {
    let mut resolve = Resolve::default();
    let (pkg, _) = resolve
        .push_path(wit)
        .with_context(|| format!("reading {}", wit.display()))?;
    let id = resolve.select_world(&[pkg], Some(world))?;
    Ok((resolve, id))
}

/// Writes `<world>.h`, `<world>.c` and `<world>_component_type.o` (the
/// world's type, which the linker carries into the module as a custom
/// section for `component` to read).
fn bindings(wit: &Path, world: &str, out: &Path) -> Result<()> {
    let (resolve, id) = load_world(wit, world)?;
    let opts = wit_bindgen_c::Opts::default();
    let mut files = wit_bindgen_core::Files::default();
    opts.build().generate(&resolve, id, &mut files)?;
    std::fs::create_dir_all(out)?;
    for (name, contents) in files.iter() {
        let path = out.join(name);
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Encodes the core module as a component (its world comes from the custom
/// section the bindings' object file put there), validating it.
fn component(core: &Path, out: &Path) -> Result<()> {
    let module = std::fs::read(core).with_context(|| format!("reading {}", core.display()))?;
    let component = ComponentEncoder::default()
        .validate(true)
        .module(&module)?
        .encode()?;
    std::fs::write(out, component).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
