use effnet::engine::pool::Pool;
use std::time::Instant;
fn main() {
    let pool = Pool::new(2);
    let mut v = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        pool.run(2, &|_p| {
            std::hint::black_box(0);
        });
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    v.sort_by(f64::total_cmp);
    println!(
        "run() of 2 trivial parts: median {:.1} us, p90 {:.1} us",
        v[v.len() / 2],
        v[v.len() * 9 / 10]
    );
}
