//! Prometheus's text exposition format (version 0.0.4): metric families,
//! each with its HELP and TYPE lines and then all of its samples, label
//! values and help text escaped as the format says.

use std::fmt::Write as _;

/// The `Content-Type` of the text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// A metric family's type.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// Only goes up (or restarts at zero).
    Counter,
    /// Any value.
    Gauge,
    /// Cumulative `_bucket{le=...}` samples, `_sum` and `_count`.
    Histogram,
}

/// Labels of a sample: name and (unescaped) value.
pub type Labels<'a> = [(&'a str, &'a str)];

/// Text being written, a family at a time.
#[derive(Debug, Default)]
pub struct Text(String);

impl Text {
    /// Start family `name`: its HELP and TYPE lines. Its samples must
    /// follow before the next family starts.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let _ = writeln!(self.0, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    /// One sample: `name{labels} value`. `value` is any number's text.
    pub fn sample(&mut self, name: &str, labels: &Labels<'_>, value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape_label(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    /// A histogram's samples: `bounds` are the finite buckets' upper
    /// bounds (as text, ascending) and `counts` the requests in each
    /// bucket, not cumulative, with one more for the unbounded bucket;
    /// `sum` is the sum of all observations.
    pub fn histogram(
        &mut self,
        name: &str,
        labels: &Labels<'_>,
        bounds: &[String],
        counts: &[u64],
        sum: f64,
    ) {
        let bucket = format!("{name}_bucket");
        let mut total = 0u64;
        let les = bounds.iter().map(String::as_str).chain(["+Inf"]);
        for (le, n) in les.zip(counts) {
            total = total.wrapping_add(*n);
            let mut with_le = labels.to_vec();
            with_le.push(("le", le));
            self.sample(&bucket, &with_le, total);
        }
        self.sample(&format!("{name}_sum"), labels, sum);
        // The +Inf bucket's count, so the two always agree.
        self.sample(&format!("{name}_count"), labels, total);
    }

    /// The text.
    pub fn finish(self) -> String {
        self.0
    }
}

/// A label value as the format quotes it: backslash, double quote and
/// line feed escaped.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// HELP text: backslash and line feed escaped.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_and_help_are_escaped() {
        assert_eq!(escape_label(r#"a\b"c"#), r#"a\\b\"c"#);
        assert_eq!(escape_label("two\nlines"), "two\\nlines");
        assert_eq!(escape_label("/dev/loop0"), "/dev/loop0");
        let mut t = Text::default();
        t.family("x_total", Kind::Counter, "a \\ b\nc");
        t.sample("x_total", &[("id", "0"), ("p", "q\"\n")], 3);
        t.sample("x_total", &[], 4);
        assert_eq!(
            t.finish(),
            "# HELP x_total a \\\\ b\\nc\n# TYPE x_total counter\n\
             x_total{id=\"0\",p=\"q\\\"\\n\"} 3\nx_total 4\n"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_inf() {
        let mut t = Text::default();
        t.family("h", Kind::Histogram, "h");
        let bounds = ["0.5".to_string(), "1".to_string()];
        t.histogram("h", &[("id", "1")], &bounds, &[2, 0, 3], 4.5);
        let text = t.finish();
        let lines: Vec<&str> = text.lines().skip(2).collect();
        assert_eq!(
            lines,
            [
                "h_bucket{id=\"1\",le=\"0.5\"} 2",
                "h_bucket{id=\"1\",le=\"1\"} 2",
                "h_bucket{id=\"1\",le=\"+Inf\"} 5",
                "h_sum{id=\"1\"} 4.5",
                "h_count{id=\"1\"} 5",
            ]
        );
    }
}
