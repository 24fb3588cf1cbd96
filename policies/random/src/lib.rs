//! random: each call goes to a candidate chosen uniformly at random.

wit_bindgen::generate!({ path: "../../wit", world: "balancer" });


struct Random;

impl Guest for Random {
    fn pick(n: u32, _generation: u64, random: u64) -> Result<u32, String> {
        if n == 0 {
            return Err("no candidates".into());
        }
        Ok((random % u64::from(n)) as u32)
    }
}

export!(Random);
