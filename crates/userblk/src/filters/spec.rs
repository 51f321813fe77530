//! Filter specs (`NAME[:key=value,...]`) and the value syntaxes their
//! options share: sizes, durations, ranges, errno names.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rustix::io::Errno;

use super::table::Opt;
use super::FilterError;

/// One `--filter` argument: a filter name and its options, in the order given.
///
/// Options are `key=value` pairs separated by commas. A piece without `=`
/// continues the previous value, so list values need no quoting:
/// `error:ops=read,write,errno=ENOSPC` sets `ops` to `read,write`.
///
/// ```
/// use userblk::filters::Spec;
/// let s: Spec = "delay:read=5ms,write=1ms-5ms".parse().unwrap();
/// assert_eq!(s.name(), "delay");
/// assert_eq!(s.options(), [("read".to_string(), "5ms".to_string()),
///                          ("write".to_string(), "1ms-5ms".to_string())]);
/// assert_eq!(s.to_string(), "delay:read=5ms,write=1ms-5ms");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    name: String,
    options: Vec<(String, String)>,
}

impl Spec {
    /// A spec with no options.
    pub fn new(name: impl Into<String>) -> Self {
        Spec {
            name: name.into(),
            options: Vec::new(),
        }
    }

    /// The same spec with `key=value` added.
    #[must_use]
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.push((key.into(), value.into()));
        self
    }

    /// The filter's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The options, in the order given.
    pub fn options(&self) -> &[(String, String)] {
        &self.options
    }
}

impl FromStr for Spec {
    type Err = FilterError;

    fn from_str(s: &str) -> Result<Self, FilterError> {
        let syntax = |msg: &str| FilterError::Syntax {
            spec: s.to_string(),
            msg: msg.to_string(),
        };
        let (name, rest) = match s.split_once(':') {
            Some((n, r)) => (n, Some(r)),
            None => (s, None),
        };
        let name = name.trim();
        if name.is_empty() {
            return Err(syntax("no filter name (expected NAME[:key=value,...])"));
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(syntax("a filter name is letters, digits, '-' and '_'"));
        }
        let mut options: Vec<(String, String)> = Vec::new();
        if let Some(rest) = rest {
            if rest.trim().is_empty() {
                return Err(syntax("nothing after ':' (expected key=value,...)"));
            }
            for piece in rest.split(',') {
                match piece.split_once('=') {
                    Some((k, v)) => {
                        let k = k.trim();
                        if k.is_empty() {
                            return Err(syntax("an option with no name before '='"));
                        }
                        if options.iter().any(|(seen, _)| seen == k) {
                            return Err(syntax(&format!("option '{k}' given twice")));
                        }
                        options.push((k.to_string(), v.trim().to_string()));
                    }
                    // A list value: `ops=read,write`.
                    None => match options.last_mut() {
                        Some((_, v)) if !piece.trim().is_empty() => {
                            v.push(',');
                            v.push_str(piece.trim());
                        }
                        _ => {
                            return Err(syntax(&format!(
                                "'{piece}' is not key=value (expected NAME[:key=value,...])"
                            )))
                        }
                    },
                }
            }
        }
        Ok(Spec {
            name: name.to_string(),
            options,
        })
    }
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut p = Printer::new(f, &self.name)?;
        for (k, v) in &self.options {
            p.opt(k, v)?;
        }
        Ok(())
    }
}

/// Writes a spec as `NAME[:key=value,...]`, the form [`Spec`] parses: the
/// one place that knows the separators, for every filter's `Display`.
pub(crate) struct Printer<'a, 'b> {
    f: &'a mut fmt::Formatter<'b>,
    sep: &'static str,
}

impl<'a, 'b> Printer<'a, 'b> {
    /// Start with the filter's name.
    pub(crate) fn new(f: &'a mut fmt::Formatter<'b>, name: &str) -> Result<Self, fmt::Error> {
        f.write_str(name)?;
        Ok(Printer { f, sep: ":" })
    }

    /// Add `key=value`.
    pub(crate) fn opt(&mut self, key: &str, value: impl fmt::Display) -> fmt::Result {
        write!(self.f, "{}{key}={value}", self.sep)?;
        self.sep = ",";
        Ok(())
    }

    /// Add `key=value` if there is a value.
    pub(crate) fn opt_some(&mut self, key: &str, value: Option<impl fmt::Display>) -> fmt::Result {
        match value {
            Some(v) => self.opt(key, v),
            None => Ok(()),
        }
    }
}

/// A spec's options as a filter reads them: each key taken at most once,
/// and any key left over is an error naming the keys the filter knows.
/// What the filter knows (its keys, their types) is its entry in the table
/// of filters ([`super::table`]).
#[derive(Debug)]
pub struct Options<'a> {
    filter: &'static str,
    known: &'static [Opt],
    pairs: &'a [(String, String)],
    taken: Vec<bool>,
}

impl<'a> Options<'a> {
    /// The options of `spec`, for filter `filter` (a filter not in the
    /// table knows no options).
    pub fn new(filter: &'static str, spec: &'a Spec) -> Self {
        Options {
            filter,
            known: super::table::lookup(filter).map_or(&[], |e| e.options),
            pairs: &spec.options,
            taken: vec![false; spec.options.len()],
        }
    }

    /// The filter these options are for.
    pub fn filter(&self) -> &'static str {
        self.filter
    }

    /// Take `key`'s raw value.
    pub fn raw(&mut self, key: &str) -> Option<&'a str> {
        let i = self.pairs.iter().position(|(k, _)| k == key)?;
        self.taken[i] = true;
        Some(self.pairs[i].1.as_str())
    }

    /// Take `key` and parse its value with `parse`; a parse error names the
    /// filter, key and value, and the type the table gives the key.
    pub fn get<T>(
        &mut self,
        key: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, FilterError> {
        let filter = self.filter;
        let kind = self.known.iter().find(|o| o.name == key).map(|o| o.kind);
        debug_assert!(kind.is_some(), "{filter}: option {key} is not in the table");
        match self.raw(key) {
            None => Ok(None),
            Some(v) => parse(v).map(Some).map_err(|msg| FilterError::BadValue {
                filter,
                key: key.to_string(),
                value: v.to_string(),
                msg: match kind {
                    Some(k) => format!("{msg}; expected {}", k.expected()),
                    None => msg,
                },
            }),
        }
    }

    /// Fail if a key was not taken, listing the keys the filter knows.
    pub fn finish(self) -> Result<(), FilterError> {
        match self.taken.iter().position(|t| !t) {
            None => Ok(()),
            Some(i) => Err(FilterError::UnknownKey {
                filter: self.filter,
                key: self.pairs[i].0.clone(),
                known: if self.known.is_empty() {
                    "none: it takes no options".into()
                } else {
                    let names: Vec<&str> = self.known.iter().map(|o| o.name).collect();
                    names.join(", ")
                },
            }),
        }
    }
}

/// A required option's value: `Err` naming the option when it was not given.
/// (Checked after [`Options::finish`], so a misspelt key is reported as such.)
pub fn required<T>(v: Option<T>, filter: &'static str, key: &str) -> Result<T, FilterError> {
    v.ok_or_else(|| FilterError::Invalid {
        filter,
        msg: format!("needs {key}=..."),
    })
}

/// A file path (not empty).
pub fn path(s: &str) -> Result<std::path::PathBuf, String> {
    if s.is_empty() {
        Err("an empty path".to_string())
    } else {
        Ok(s.into())
    }
}

/// A byte size (`4096`, `512K`, `1G`).
pub fn size(s: &str) -> Result<u64, String> {
    crate::size::parse(s).map_err(|e| e.to_string())
}

/// A duration: a number with a unit `ns`, `us`, `ms`, `s` or `m` (`5ms`,
/// `1.5s`); `0` needs none.
pub fn duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("'{s}' has no unit (use ns, us, ms, s or m)"))?;
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a number with a unit"))?;
    let scale = match unit {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" | "min" => 60.0,
        _ => return Err(format!("unknown unit '{unit}' (use ns, us, ms, s or m)")),
    };
    Duration::try_from_secs_f64(n * scale).map_err(|_| format!("'{s}' is out of range"))
}

/// Format a duration in the largest unit that shows it exactly (`5ms`, `1500us`).
pub fn format_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        return "0".into();
    }
    for (unit, per) in [("s", 1_000_000_000u128), ("ms", 1_000_000), ("us", 1_000)] {
        if ns.is_multiple_of(per) {
            return format!("{}{unit}", ns / per);
        }
    }
    format!("{ns}ns")
}

/// A duration or a range `LOW-HIGH` of them, for random values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationRange {
    /// Shortest.
    pub low: Duration,
    /// Longest (equal to `low` for a fixed duration).
    pub high: Duration,
}

impl DurationRange {
    /// A fixed duration.
    pub const fn fixed(d: Duration) -> Self {
        DurationRange { low: d, high: d }
    }

    /// Parse `5ms` or `1ms-5ms`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.split_once('-') {
            None => duration(s).map(Self::fixed),
            Some((a, b)) => {
                let (low, high) = (duration(a)?, duration(b)?);
                if low > high {
                    return Err(format!("the range {s} runs backwards"));
                }
                Ok(DurationRange { low, high })
            }
        }
    }

    /// A value from the range, `u` in `[0, 1)` picking where.
    pub fn pick(&self, u: f64) -> Duration {
        if self.low == self.high {
            return self.low;
        }
        self.low + (self.high - self.low).mul_f64(u.clamp(0.0, 1.0))
    }
}

impl fmt::Display for DurationRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.low == self.high {
            f.write_str(&format_duration(self.low))
        } else {
            write!(
                f,
                "{}-{}",
                format_duration(self.low),
                format_duration(self.high)
            )
        }
    }
}

/// A byte range `START-END` (end exclusive, sizes with suffixes).
pub fn byte_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("'{s}' is not START-END"))?;
    let (start, end) = (size(a)?, size(b)?);
    if start >= end {
        return Err(format!("the range {s} is empty"));
    }
    Ok((start, end))
}

/// A probability from 0 to 1.
pub fn probability(s: &str) -> Result<f64, String> {
    let p: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number"))?;
    if !(0.0..=1.0).contains(&p) {
        return Err(format!("{p} is not between 0 and 1"));
    }
    Ok(p)
}

/// A non-negative integer.
pub fn number(s: &str) -> Result<u64, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a whole number"))
}

/// The errnos filters know by name (any other is accepted by number).
const ERRNOS: &[(&str, Errno)] = &[
    ("EIO", Errno::IO),
    ("ENOSPC", Errno::NOSPC),
    ("EPERM", Errno::PERM),
    ("EACCES", Errno::ACCESS),
    ("EROFS", Errno::ROFS),
    ("ENOMEM", Errno::NOMEM),
    ("EINVAL", Errno::INVAL),
    ("EAGAIN", Errno::AGAIN),
    ("EBUSY", Errno::BUSY),
    ("ENODEV", Errno::NODEV),
    ("ENXIO", Errno::NXIO),
    ("ETIMEDOUT", Errno::TIMEDOUT),
    ("ECONNRESET", Errno::CONNRESET),
    ("ENOLINK", Errno::NOLINK),
    ("ECANCELED", Errno::CANCELED),
    ("EOPNOTSUPP", Errno::OPNOTSUPP),
    ("EFBIG", Errno::FBIG),
    ("EDQUOT", Errno::DQUOT),
    ("EILSEQ", Errno::ILSEQ),
    ("EBADMSG", Errno::BADMSG),
    ("EREMOTEIO", Errno::REMOTEIO),
];

/// An errno by name (`EIO`, `ENOSPC`, case-insensitive) or number (`5`).
pub fn errno(s: &str) -> Result<Errno, String> {
    let t = s.trim();
    if let Some(&(_, e)) = ERRNOS.iter().find(|(n, _)| n.eq_ignore_ascii_case(t)) {
        return Ok(e);
    }
    match t.parse::<i32>() {
        Ok(n) if (1..4096).contains(&n) => Ok(Errno::from_raw_os_error(n)),
        _ => Err(format!(
            "unknown errno '{s}' (use a number or one of {})",
            ERRNOS
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// The name of an errno (`EIO`), or `E<number>` for one without a name here.
pub fn errno_name(e: Errno) -> ErrnoName {
    ErrnoName(e)
}

/// An errno shown by name; see [`errno_name`].
#[derive(Debug, Clone, Copy)]
pub struct ErrnoName(Errno);

impl fmt::Display for ErrnoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match ERRNOS.iter().find(|(_, e)| *e == self.0) {
            Some((n, _)) => f.write_str(n),
            None => write!(f, "E{}", self.0.raw_os_error()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> Result<Spec, FilterError> {
        s.parse()
    }

    #[test]
    fn specs_parse_and_print_back() {
        let s = spec("readonly").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((s.name(), s.options().len()), ("readonly", 0));
        let s =
            spec("error:ops=read,write,errno=ENOSPC,rate=0.5").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            s.options(),
            [
                ("ops".to_string(), "read,write".to_string()),
                ("errno".to_string(), "ENOSPC".to_string()),
                ("rate".to_string(), "0.5".to_string())
            ]
        );
        assert_eq!(s.to_string(), "error:ops=read,write,errno=ENOSPC,rate=0.5");
        assert_eq!(spec(&s.to_string()).ok(), Some(s));
    }

    #[test]
    fn bad_specs_say_why() {
        for (bad, why) in [
            ("", "no filter name"),
            (":a=1", "no filter name"),
            ("de lay", "letters"),
            ("delay:", "nothing after"),
            ("delay:read", "not key=value"),
            ("delay:=5ms", "no name before"),
            ("delay:read=1ms,read=2ms", "twice"),
            ("delay:read=1ms,,", "not key=value"),
        ] {
            match spec(bad) {
                Err(e) => assert!(e.to_string().contains(why), "{bad}: {e}"),
                Ok(s) => panic!("{bad} parsed as {s:?}"),
            }
        }
    }

    #[test]
    fn options_reject_unknown_keys() {
        let s = spec("delay:read=5ms,wrtie=1ms").unwrap_or_else(|e| panic!("{e}"));
        let mut o = Options::new("delay", &s);
        assert_eq!(
            o.get("read", duration).ok().flatten(),
            Some(Duration::from_millis(5))
        );
        let e = o.finish().err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some(
                "filter delay: unknown option 'wrtie' \
                 (known: all, read, write, flush, discard, write_zeroes, seed)"
            )
        );
        let s = spec("delay:read=5").unwrap_or_else(|e| panic!("{e}"));
        let e = Options::new("delay", &s).get("read", duration).err();
        assert!(e.is_some_and(|e| e.to_string().contains("read=5: '5' has no unit")));
    }

    #[test]
    fn durations() {
        let ms = Duration::from_millis;
        assert_eq!(duration("5ms"), Ok(ms(5)));
        assert_eq!(duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(duration("1.5s"), Ok(ms(1500)));
        assert_eq!(duration("0"), Ok(Duration::ZERO));
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        for bad in ["", "5", "ms", "5xs", "-1ms", "1e999s"] {
            assert!(duration(bad).is_err(), "{bad}");
        }
        for d in [ms(5), ms(1500), Duration::from_nanos(1234), Duration::ZERO] {
            assert_eq!(duration(&format_duration(d)), Ok(d));
        }
        let r = DurationRange::parse("1ms-5ms");
        assert_eq!(
            r,
            Ok(DurationRange {
                low: ms(1),
                high: ms(5)
            })
        );
        let r = r.unwrap_or(DurationRange::fixed(Duration::ZERO));
        assert_eq!(r.pick(0.0), ms(1));
        assert_eq!(r.pick(0.5), ms(3));
        assert_eq!(r.to_string(), "1ms-5ms");
        assert!(DurationRange::parse("5ms-1ms").is_err());
    }

    #[test]
    fn values() {
        assert_eq!(byte_range("1M-2M"), Ok((1 << 20, 2 << 20)));
        assert!(byte_range("2M-1M").is_err() && byte_range("1M").is_err());
        assert_eq!(probability("0.01"), Ok(0.01));
        assert!(probability("1.5").is_err() && probability("x").is_err());
        assert_eq!(errno("EIO"), Ok(Errno::IO));
        assert_eq!(errno("enospc"), Ok(Errno::NOSPC));
        assert_eq!(errno("28"), Ok(Errno::NOSPC));
        assert!(errno("EWHAT").is_err() && errno("0").is_err());
        assert_eq!(errno_name(Errno::NOSPC).to_string(), "ENOSPC");
        assert_eq!(
            errno_name(Errno::from_raw_os_error(200)).to_string(),
            "E200"
        );
    }
}
