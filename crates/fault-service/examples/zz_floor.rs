//! x
use fault_service::bench::{self as measure, FirstTouch};
fn main() {
    for _ in 0..5 {
        let p = measure::first_touch(FirstTouch::Plain, 16384)
            .unwrap()
            .as_nanos() as f64
            / 16384.0;
        let f = measure::first_touch(FirstTouch::InThreadFloor, 16384);
        match f {
            Ok(f) => {
                let f = f.as_nanos() as f64 / 16384.0;
                println!("plain {p:.0} floor {f:.0} ratio {:.2}", f / p);
            }
            Err(e) => println!("plain {p:.0} err {e}"),
        }
    }
}
