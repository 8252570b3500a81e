// detect.rs: a Rust program (build: rustc -O -C target-feature=+crt-static detect.rs, a
// static-pie) that prints what is_x86_feature_detected! says for sse4_1, sse4_2, popcnt, avx2.
fn main() {
    for (name, on) in [("sse4_1", is_x86_feature_detected!("sse4.1")), ("sse4_2", is_x86_feature_detected!("sse4.2")),
                       ("popcnt", is_x86_feature_detected!("popcnt")), ("avx2", is_x86_feature_detected!("avx2"))] {
        println!("{} rust={}", name, on as u8);
    }
}
