//! `weft bench fanout` and `weft bench reqrep` through the binary, with small counts: the
//! benchmarks run their child processes, finish, and report what they measured.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Bound on one benchmark run: a stuck run fails instead of hanging.
const WAIT: Duration = Duration::from_secs(120);

/// Runs `weft ARGS` and parses its stdout as one JSON object.
fn bench_json(args: &[&str]) -> serde_json::Value {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("weft starts");
    // Read both pipes while it runs, so a chatty run cannot block on a full pipe.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > WAIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("weft {args:?} did not finish within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = stdout.join().unwrap();
    let stderr = stderr.join().unwrap();
    assert!(
        status.success(),
        "weft {args:?} failed ({status}): {stderr}"
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("weft {args:?} printed {stdout:?}, not JSON: {e}"))
}

fn positive(value: &serde_json::Value, field: &str) -> f64 {
    let number = value[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} missing or not a number in {value}"));
    assert!(
        number > 0.0 && number.is_finite(),
        "{field} = {number} in {value}"
    );
    number
}

#[test]
fn fanout_reports_every_event_at_every_subscriber() {
    let result = bench_json(&[
        "bench", "fanout", "--subs", "2", "--size", "32", "--count", "2000", "--json",
    ]);
    assert_eq!(result["bench"], "fanout");
    assert_eq!(result["subs"], 2);
    assert_eq!(result["size"], 32);
    assert_eq!(result["count"], 2000);
    assert_eq!(
        result["delivered"], 4000,
        "every subscriber gets every event"
    );
    let seconds = positive(&result, "seconds");
    let rate = positive(&result, "msgs_per_sec");
    let relative = (rate * seconds - 4000.0).abs() / 4000.0;
    assert!(
        relative < 1e-6,
        "msgs_per_sec × seconds ≠ delivered: {result}"
    );
    positive(&result, "events_per_sec");
    positive(&result, "publisher_acked_seconds");
    assert!(
        positive(&result, "slowest_sub_seconds") <= seconds,
        "one subscriber's span exceeds the span over all of them: {result}"
    );
}

#[test]
fn fanout_on_the_multi_thread_runtime() {
    let result = bench_json(&[
        "bench",
        "fanout",
        "--subs",
        "1",
        "--count",
        "500",
        "--runtime",
        "multi-thread",
        "--json",
    ]);
    assert_eq!(result["runtime"], "multi-thread");
    assert_eq!(result["delivered"], 500);
    positive(&result, "msgs_per_sec");
}

#[test]
fn reqrep_times_every_request() {
    let result = bench_json(&[
        "bench", "reqrep", "--count", "200", "--warmup", "50", "--size", "100", "--json",
    ]);
    assert_eq!(result["bench"], "reqrep");
    assert_eq!(result["count"], 200);
    assert_eq!(result["size"], 100);
    let p50 = positive(&result, "p50_us");
    let p99 = positive(&result, "p99_us");
    let p999 = positive(&result, "p999_us");
    assert!(
        p50 <= p99 && p99 <= p999,
        "percentiles out of order: {result}"
    );
    assert!(p999 < 10_000_000.0, "a request took over 10 s: {result}");
}

#[test]
fn benches_refuse_a_body_too_small_for_the_counter() {
    for args in [
        ["bench", "fanout", "--size", "4"],
        ["bench", "reqrep", "--size", "4"],
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_weft"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("weft runs");
        assert!(!output.status.success(), "weft {args:?} accepted --size 4");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("--size"), "weft {args:?} said {stderr}");
    }
}
