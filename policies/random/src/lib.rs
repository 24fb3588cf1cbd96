//! random: each call goes to a candidate chosen uniformly at random.

wit_bindgen::generate!({ path: "../../wit", world: "balancer" });

use weir::policy::{backends, env};

struct Random;

impl Guest for Random {
    fn pick() -> Result<u32, String> {
        let n = backends::count();
        if n == 0 {
            return Err("no candidates".into());
        }
        Ok((env::random() % u64::from(n)) as u32)
    }
}

export!(Random);
