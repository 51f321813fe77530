//! The one table of filters: each filter's name, one line of help, its
//! options (name, type, default, help) and how its spec is parsed. Spec
//! parsing ([`super::Config::parse`]), the `--filter` help ([`help`]) and
//! the error messages (the known filters, a filter's known options, the
//! type a bad value should have) all read it.

use std::fmt::Write;

use super::spec::{Options, Spec};
use super::stack::Config;
use super::{cache, cow, delay, error, flakey, log, offset, rate, stats, truncate, FilterError};

/// What an option's value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A byte size: `4096`, `512K`, `1G`.
    Size,
    /// A duration: `250us`, `5ms`, `1.5s`.
    Duration,
    /// A duration or a range of them: `5ms`, `1ms-5ms`.
    DurationRange,
    /// A whole number.
    Number,
    /// A probability from 0 to 1.
    Probability,
    /// An errno by name or number.
    Errno,
    /// A byte range `START-END`.
    ByteRange,
    /// A file path.
    Path,
    /// `yes` or `no`.
    YesNo,
    /// A list of ops, or `all`.
    Ops,
    /// One of these words.
    Choice(&'static [&'static str]),
    /// `HOST:PORT`.
    Address,
    /// Bytes per second.
    Bandwidth,
    /// Requests per second.
    PerSecond,
}

impl Kind {
    /// How the value is written, for the help (`SIZE`, `yes|no`).
    pub fn placeholder(self) -> String {
        match self {
            Kind::Size => "SIZE".into(),
            Kind::Duration => "DURATION".into(),
            Kind::DurationRange => "DURATION[-DURATION]".into(),
            Kind::Number => "N".into(),
            Kind::Probability => "P".into(),
            Kind::Errno => "ERRNO".into(),
            Kind::ByteRange => "START-END".into(),
            Kind::Path => "PATH".into(),
            Kind::YesNo => "yes|no".into(),
            Kind::Ops => "OP,...".into(),
            Kind::Choice(words) => words.join("|"),
            Kind::Address => "HOST:PORT".into(),
            Kind::Bandwidth => "SIZE[/s]".into(),
            Kind::PerSecond => "N[/s]".into(),
        }
    }

    /// What a value must look like, for an error about one that does not.
    pub fn expected(self) -> String {
        match self {
            Kind::Size => "a size such as 4096, 512K or 1G".into(),
            Kind::Duration => "a duration such as 250us, 5ms or 1.5s".into(),
            Kind::DurationRange => "a duration or a range of them, such as 5ms or 1ms-5ms".into(),
            Kind::Number => "a whole number".into(),
            Kind::Probability => "a number from 0 to 1".into(),
            Kind::Errno => "an errno name or number, such as EIO or 28".into(),
            Kind::ByteRange => "a byte range START-END, such as 1M-2M".into(),
            Kind::Path => "a path".into(),
            Kind::YesNo => "yes or no".into(),
            Kind::Ops => format!("all, or ops from {}", super::OP_KEYS.join(", ")),
            Kind::Choice(words) => format!("one of {}", words.join(", ")),
            Kind::Address => "HOST:PORT, such as 127.0.0.1:9100".into(),
            Kind::Bandwidth => "bytes per second, such as 10M or 10M/s".into(),
            Kind::PerSecond => "requests per second, such as 1000 or 1000/s".into(),
        }
    }
}

/// What an option is when the spec leaves it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// This value (as it would be written).
    Value(&'static str),
    /// No value; the text says what that means.
    Unset(&'static str),
    /// The filter needs it.
    Required,
}

/// One option of a filter.
#[derive(Debug, Clone, Copy)]
pub struct Opt {
    /// Its key.
    pub name: &'static str,
    /// Its value's type.
    pub kind: Kind,
    /// Its value when left out.
    pub default: Fallback,
    /// One line of help.
    pub help: &'static str,
}

/// One filter.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// Its name in specs.
    pub name: &'static str,
    /// One line of help.
    pub help: &'static str,
    /// Its options.
    pub options: &'static [Opt],
    /// The shortest spec that works (for a filter that needs one of
    /// several options, which [`Fallback`] cannot say).
    pub example: &'static str,
    /// Parse and check a spec's options into the filter's [`Config`],
    /// from which [`Config::wrap`] builds the filter.
    pub parse: fn(&Spec) -> Result<Config, FilterError>,
}

const fn opt(name: &'static str, kind: Kind, default: Fallback, help: &'static str) -> Opt {
    Opt {
        name,
        kind,
        default,
        help,
    }
}

use Fallback::{Required, Unset, Value};
use Kind::{DurationRange as Delay, Path, PerSecond, Size};

const FROM_CLOCK: Fallback = Unset("from the clock");

/// Every filter.
pub static FILTERS: &[Entry] = &[
    Entry {
        name: "readonly",
        help: "refuses writes, discards and write-zeroes; advertises a read-only disk",
        options: &[],
        example: "readonly",
        parse: |s| {
            Options::new("readonly", s).finish()?;
            Ok(Config::ReadOnly)
        },
    },
    Entry {
        name: "offset",
        help: "serves a byte range of the target",
        options: &[
            opt(
                "offset",
                Size,
                Value("0"),
                "where the device starts in the target",
            ),
            opt(
                "size",
                Size,
                Unset("the rest of the target"),
                "the device's size",
            ),
        ],
        example: "offset:offset=1M",
        parse: |s| offset::Config::parse(s).map(Config::Offset),
    },
    Entry {
        name: "truncate",
        help: "another apparent size: smaller, or larger with zeroes past the end",
        options: &[opt("size", Size, Required, "the device's size")],
        example: "truncate:size=1G",
        parse: |s| truncate::Config::parse(s).map(Config::Truncate),
    },
    Entry {
        name: "delay",
        help: "fixed or random latency per op, without blocking other requests",
        options: &[
            opt(
                "all",
                Delay,
                Unset("none"),
                "delay of every op not given on its own",
            ),
            opt("read", Delay, Unset("all's"), "delay of reads"),
            opt("write", Delay, Unset("all's"), "delay of writes"),
            opt("flush", Delay, Unset("all's"), "delay of flushes"),
            opt("discard", Delay, Unset("all's"), "delay of discards"),
            opt(
                "write_zeroes",
                Delay,
                Unset("all's"),
                "delay of write-zeroes",
            ),
            opt("seed", Kind::Number, FROM_CLOCK, "seed of random delays"),
        ],
        example: "delay",
        parse: |s| delay::Config::parse(s).map(Config::Delay),
    },
    Entry {
        name: "error",
        help: "fails chosen requests with a chosen errno",
        options: &[
            opt("ops", Kind::Ops, Value("all"), "the ops that may fail"),
            opt("errno", Kind::Errno, Value("EIO"), "what they fail with"),
            opt(
                "rate",
                Kind::Probability,
                Value("1"),
                "the chance a matching request fails",
            ),
            opt(
                "range",
                Kind::ByteRange,
                Unset("everywhere"),
                "only requests touching these bytes",
            ),
            opt("file", Path, Unset("always"), "only while this file exists"),
            opt("seed", Kind::Number, FROM_CLOCK, "seed of the draws"),
        ],
        example: "error",
        parse: |s| error::Config::parse(s).map(Config::Error),
    },
    Entry {
        name: "rate",
        help: "bandwidth and IOPS limits (token buckets); requests wait, never fail",
        options: &[
            opt(
                "bw",
                Kind::Bandwidth,
                Unset("no limit"),
                "bytes per second of reads and writes",
            ),
            opt("iops", PerSecond, Unset("no limit"), "requests per second"),
            opt(
                "read_bw",
                Kind::Bandwidth,
                Unset("no limit"),
                "bytes per second of reads",
            ),
            opt(
                "read_iops",
                PerSecond,
                Unset("no limit"),
                "reads per second",
            ),
            opt(
                "write_bw",
                Kind::Bandwidth,
                Unset("no limit"),
                "bytes per second of writes",
            ),
            opt(
                "write_iops",
                PerSecond,
                Unset("no limit"),
                "writes per second",
            ),
            opt(
                "burst",
                Kind::Duration,
                Value("0"),
                "unused rate saved up, as time at full rate",
            ),
        ],
        example: "rate:bw=10M",
        parse: |s| rate::Config::parse(s).map(Config::Rate),
    },
    Entry {
        name: "log",
        help: "every request and its result as JSON lines",
        options: &[opt("file", Path, Required, "the file appended to")],
        example: "log:file=requests.log",
        parse: |s| log::Config::parse(s).map(Config::Log),
    },
    Entry {
        name: "stats",
        help: "counts, bytes, errors and latency histograms per op (userblk stats)",
        options: &[
            opt(
                "file",
                Path,
                Unset("the daemon's, for the outermost"),
                "JSON snapshot, every second",
            ),
            opt(
                "prometheus",
                Kind::Address,
                Unset("off"),
                "serve Prometheus metrics there",
            ),
        ],
        example: "stats",
        parse: |s| stats::Config::parse(s).map(Config::Stats),
    },
    Entry {
        name: "cow",
        help: "a writable copy-on-write overlay in a local file; the target is never written",
        options: &[
            opt(
                "file",
                Path,
                Unset("an unnamed temporary file"),
                "the overlay file",
            ),
            opt(
                "cluster",
                Size,
                Unset("the overlay's, or 64K"),
                "the unit copied up",
            ),
            opt(
                "keep",
                Kind::YesNo,
                Unset("yes with file="),
                "keep the overlay file at exit",
            ),
        ],
        example: "cow",
        parse: |s| cow::Config::parse(s).map(Config::Cow),
    },
    Entry {
        name: "cache",
        help: "a read (or write-back) cache in memory or a file, LRU, for slow targets",
        options: &[
            opt("size", Size, Value("256M"), "most bytes cached"),
            opt("block", Size, Value("64K"), "the unit cached and evicted"),
            opt(
                "file",
                Path,
                Unset("memory"),
                "keep the blocks in this file",
            ),
            opt(
                "mode",
                Kind::Choice(&["writethrough", "writeback"]),
                Value("writethrough"),
                "where writes complete",
            ),
        ],
        example: "cache",
        parse: |s| cache::Config::parse(s).map(Config::Cache),
    },
    Entry {
        name: "flakey",
        help: "a volatile write cache that loses unflushed writes on a power cut",
        options: &[
            opt(
                "trigger",
                Path,
                Unset("none"),
                "power is off while this file exists",
            ),
            opt(
                "max_dirty",
                Size,
                Value("64M"),
                "most data held back before writing down",
            ),
            opt(
                "broken",
                Kind::Choice(&["ack-flush"]),
                Unset("not broken"),
                "a deliberately broken disk",
            ),
        ],
        example: "flakey",
        parse: |s| flakey::Config::parse(s).map(Config::Flakey),
    },
];

/// The filter called `name`.
pub fn lookup(name: &str) -> Option<&'static Entry> {
    FILTERS.iter().find(|e| e.name == name)
}

/// The names of every filter, comma separated.
pub fn names() -> String {
    FILTERS
        .iter()
        .map(|e| e.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// One line for `--filter` in a short help.
pub fn short_help() -> String {
    format!(
        "Put a filter between the device and its target: NAME[:key=value,...] ({}). \
         Repeatable; the first given sits nearest the device",
        names()
    )
}

/// The help of `--filter`: the syntax and every filter with its options.
pub fn help() -> String {
    let mut s = String::from(
        "Put a filter between the device and its target: NAME[:key=value,...]. \
         Repeatable; the first given sits nearest the device (see docs/filters).\n",
    );
    for e in FILTERS {
        let _ = write!(s, "\n{}: {}", e.name, e.help);
        for o in e.options {
            let default = match o.default {
                Value(v) => format!("default {v}"),
                Unset(what) => format!("default: {what}"),
                Required => "required".into(),
            };
            let key = format!("{}={}", o.name, o.kind.placeholder());
            let _ = write!(s, "\n  {key:<26} {} ({default})", o.help);
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(spec: &str) -> Result<Config, FilterError> {
        Config::parse(&spec.parse()?)
    }

    /// `e`'s example with `key=value` set (replacing the example's own).
    fn with(e: &Entry, key: &str, value: &str) -> String {
        let example: Spec = e.example.parse().unwrap_or_else(|err| panic!("{err}"));
        let mut spec = Spec::new(e.name);
        for (k, v) in example.options().iter().filter(|(k, _)| k != key) {
            spec = spec.with(k, v);
        }
        spec.with(key, value).to_string()
    }

    #[test]
    fn every_entry_parses_with_its_defaults() {
        for e in FILTERS {
            assert_eq!(e.example.split(':').next(), Some(e.name));
            if let Err(err) = parse(e.example) {
                panic!("{}: {err}", e.example);
            }
            // Each default, given explicitly, is a value the filter takes.
            for o in e.options {
                if let Value(v) = o.default {
                    let spec = with(e, o.name, v);
                    if let Err(err) = parse(&spec) {
                        panic!("{spec}: {err}");
                    }
                }
            }
        }
    }

    #[test]
    fn every_option_in_the_table_is_one_the_filter_reads() {
        // An option the table lists but the filter does not take is an
        // unknown option; a bad value for one it takes is a bad value.
        for e in FILTERS {
            for o in e.options {
                let spec = with(e, o.name, "\u{1}bad");
                match parse(&spec) {
                    Err(FilterError::BadValue { key, msg, .. }) => {
                        assert_eq!(key, o.name);
                        assert!(msg.contains(&o.kind.expected()), "{spec}: {msg}");
                    }
                    // A path takes anything; the spec then parses.
                    Ok(_) if o.kind == Path => {}
                    other => panic!("{spec}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn errors_name_what_is_known_and_expected() {
        let e = parse("nope").err().map(|e| e.to_string());
        let want = format!("unknown filter 'nope' (known: {})", names());
        assert_eq!(e.as_deref(), Some(want.as_str()));
        for f in FILTERS {
            assert!(want.contains(f.name), "{} missing", f.name);
        }
        let e = parse("cache:sise=1M").err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("filter cache: unknown option 'sise' (known: size, block, file, mode)")
        );
        let e = parse("delay:read=fast").err().map(|e| e.to_string());
        let e = e.unwrap_or_default();
        assert!(e.starts_with("filter delay: read=fast: "), "{e}");
        assert!(e.ends_with(&Kind::DurationRange.expected()), "{e}");
        let e = parse("readonly:x=1").err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("it takes no options")));
    }

    #[test]
    fn help_lists_every_filter_and_option() {
        let (long, short) = (help(), short_help());
        assert_eq!(FILTERS.len(), 11);
        for e in FILTERS {
            assert!(
                long.contains(&format!("\n{}: {}", e.name, e.help)),
                "{}",
                e.name
            );
            assert!(short.contains(e.name), "{}", e.name);
            for o in e.options {
                assert!(
                    long.contains(&format!("  {}=", o.name)),
                    "{}:{}",
                    e.name,
                    o.name
                );
            }
        }
        assert!(long.contains("size=SIZE") && long.contains("(required)"));
    }
}
