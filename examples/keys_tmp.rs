use convlab::models::{ModelConfig, ModelName};
use burn::prelude::*;
fn main() {
    let name = std::env::args().nth(1).unwrap();
    let n = ModelName::from_name(&name).unwrap();
    let cfg = ModelConfig::for_model(n, 10, 3);
    let m = cfg.build(&Device::flex()).unwrap();
    let t = convlab::train::checkpoint::module_tensors(&m);
    println!("{} tensors", t.len());
    for (k, v) in t.iter() { println!("{k} {:?}", v.shape); }
}
