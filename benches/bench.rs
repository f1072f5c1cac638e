//! Benchmark harness: placeholder until the benchmark work lands.
fn main() {}
