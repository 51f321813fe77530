//! `userblk metrics`: every device's request counters as Prometheus text,
//! printed once (`--once`) or served over HTTP (`--listen`), read from the
//! saved states and the counter files the daemons keep beside them.

use userblk::metrics::layout::{self, bucket_bound_us, FINITE_BUCKETS, OPS};
use userblk::metrics::Snapshot;
use userblk::state::{self, DeviceState};

use crate::cli::MetricsArgs;
use crate::exposition::{Kind, Text, CONTENT_TYPE};
use crate::http::{Listener, Resource};

/// `userblk metrics`.
pub fn run(args: &MetricsArgs) -> anyhow::Result<()> {
    match &args.listen {
        None => {
            crate::out::bytes(render().as_bytes());
            Ok(())
        }
        Some(listen) => {
            let listener = Listener::bind(listen)?;
            tracing::info!("serving metrics at {}/metrics", listener.address());
            listener.serve(Resource {
                path: "/metrics",
                content_type: CONTENT_TYPE,
                body: render,
            })
        }
    }
}

/// One device as exposed.
struct Device {
    /// The labels every sample of the device has (`id`).
    labels: Vec<(&'static str, String)>,
    /// What `userblk_device_info` adds to them.
    info: Vec<(&'static str, String)>,
    up: bool,
    /// Its counters, if its daemon keeps them.
    counts: Option<Snapshot>,
}

/// The labels that name a device in every sample.
fn device_labels(st: &DeviceState) -> Vec<(&'static str, String)> {
    let mut labels = vec![("id", st.id.to_string())];
    if let Some(name) = &st.name {
        labels.push(("name", name.clone()));
    }
    labels
}

fn device(st: &DeviceState) -> Device {
    let target = st
        .target
        .get("type")
        .and_then(|t| t.as_str())
        .unwrap_or_default();
    let counts = match Snapshot::read(&state::metrics_path(st.id)) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("device {}: {e}", st.id);
            None
        }
    };
    Device {
        labels: device_labels(st),
        info: vec![
            ("frontend", st.frontend.clone()),
            ("target", target.to_owned()),
            ("block_device", st.block_device.clone()),
        ],
        up: st.daemon_alive(),
        counts,
    }
}

/// The text for every device with saved state, now.
fn render() -> String {
    let devices: Vec<Device> = DeviceState::ids()
        .into_iter()
        .filter_map(|id| DeviceState::load(id).ok().flatten())
        .map(|st| device(&st))
        .collect();
    text(&devices)
}

fn borrowed<'a>(labels: &'a [(&'static str, String)]) -> Vec<(&'a str, &'a str)> {
    labels.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Histogram bucket bounds in seconds, as text (exact: whole microseconds).
fn bounds() -> Vec<String> {
    (0..FINITE_BUCKETS)
        .map(|i| {
            let us = bucket_bound_us(i);
            format!("{}.{:06}", us / 1_000_000, us % 1_000_000)
        })
        .collect()
}

/// A counter family with a sample per device and op.
fn per_op(
    t: &mut Text,
    devs: &[Device],
    name: &str,
    help: &str,
    field: fn(&userblk::metrics::OpTotals) -> u64,
) {
    t.family(name, Kind::Counter, help);
    for d in devs {
        let Some(c) = &d.counts else { continue };
        for op in OPS {
            let mut l = borrowed(&d.labels);
            l.push(("op", layout::op_name(op)));
            t.sample(name, &l, field(c.op(op)));
        }
    }
}

/// A family with one sample per device that has counters.
fn per_device(
    t: &mut Text,
    devs: &[Device],
    name: &str,
    kind: Kind,
    help: &str,
    value: fn(&Snapshot) -> u64,
) {
    t.family(name, kind, help);
    for d in devs {
        if let Some(c) = &d.counts {
            t.sample(name, &borrowed(&d.labels), value(c));
        }
    }
}

fn text(devs: &[Device]) -> String {
    let mut t = Text::default();
    t.family(
        "userblk_device_info",
        Kind::Gauge,
        "A device with saved state: its frontend, target and block device (always 1).",
    );
    for d in devs {
        let mut l = borrowed(&d.labels);
        l.extend(borrowed(&d.info));
        t.sample("userblk_device_info", &l, 1);
    }
    t.family(
        "userblk_device_up",
        Kind::Gauge,
        "Whether the device's daemon is running (1) or not (0).",
    );
    for d in devs {
        t.sample("userblk_device_up", &borrowed(&d.labels), u8::from(d.up));
    }
    per_op(
        &mut t,
        devs,
        "userblk_requests_total",
        "Requests finished, failed ones included.",
        |o| o.requests,
    );
    per_op(
        &mut t,
        devs,
        "userblk_bytes_total",
        "Bytes of the requests that succeeded (the range, for discard and write-zeroes).",
        |o| o.bytes,
    );
    per_op(
        &mut t,
        devs,
        "userblk_errors_total",
        "Requests that failed.",
        |o| o.errors,
    );
    let name = "userblk_request_duration_seconds";
    t.family(
        name,
        Kind::Histogram,
        "Time from a request's start to its result, in the daemon.",
    );
    let bounds = bounds();
    for d in devs {
        let Some(c) = &d.counts else { continue };
        for op in OPS {
            let o = c.op(op);
            let mut l = borrowed(&d.labels);
            l.push(("op", layout::op_name(op)));
            let sum = o.sum_ns as f64 / 1e9;
            t.histogram(name, &l, &bounds, &o.buckets, sum);
        }
    }
    per_device(
        &mut t,
        devs,
        "userblk_inflight_requests",
        Kind::Gauge,
        "Requests the daemon holds now (queue depth in use).",
        |s| s.inflight,
    );
    per_device(
        &mut t,
        devs,
        "userblk_recoveries_total",
        Kind::Counter,
        "Times a new daemon took the device over (recover, upgrade).",
        |s| s.recoveries,
    );
    t.finish()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use userblk::Op;

    #[test]
    fn every_family_has_its_samples_and_labels() {
        let mut counts = Snapshot::default();
        counts.ops[layout::op_index(Op::Write)].requests = 3;
        counts.ops[layout::op_index(Op::Write)].bytes = 12288;
        counts.ops[layout::op_index(Op::Write)].buckets[2] = 3;
        counts.recoveries = 2;
        let devs = [
            Device {
                labels: vec![("id", "0".into())],
                info: vec![
                    ("frontend", "fuse".into()),
                    ("target", "mem".into()),
                    ("block_device", "/dev/loop\"7".into()),
                ],
                up: true,
                counts: Some(counts),
            },
            Device {
                labels: vec![("id", "1".into())],
                info: vec![],
                up: false,
                counts: None,
            },
        ];
        let text = text(&devs);
        let has = |l: &str| assert!(text.lines().any(|x| x == l), "no {l:?} in\n{text}");
        has(
            r#"userblk_device_info{id="0",frontend="fuse",target="mem",block_device="/dev/loop\"7"} 1"#,
        );
        has(r#"userblk_device_up{id="0"} 1"#);
        has(r#"userblk_device_up{id="1"} 0"#);
        has(r#"userblk_requests_total{id="0",op="write"} 3"#);
        has(r#"userblk_bytes_total{id="0",op="write"} 12288"#);
        has(r#"userblk_errors_total{id="0",op="read"} 0"#);
        has(r#"userblk_request_duration_seconds_bucket{id="0",op="write",le="0.000002"} 0"#);
        has(r#"userblk_request_duration_seconds_bucket{id="0",op="write",le="0.000004"} 3"#);
        has(r#"userblk_request_duration_seconds_bucket{id="0",op="write",le="16.777216"} 3"#);
        has(r#"userblk_request_duration_seconds_bucket{id="0",op="write",le="+Inf"} 3"#);
        has(r#"userblk_request_duration_seconds_count{id="0",op="write"} 3"#);
        has(r#"userblk_recoveries_total{id="0"} 2"#);
        has(r#"userblk_inflight_requests{id="0"} 0"#);
        // A device without counters has no counter samples.
        assert!(!text.contains(r#"userblk_requests_total{id="1""#));
        // Each family once, its samples together right after it.
        for fam in [
            "userblk_device_info",
            "userblk_requests_total",
            "userblk_request_duration_seconds",
        ] {
            assert_eq!(text.matches(&format!("# TYPE {fam} ")).count(), 1);
        }
        assert!(text.ends_with('\n'));
    }
}
