//! Stacks from specs: parse and check every `--filter`, then wrap the
//! target in them, the first spec outermost.

use std::path::PathBuf;
use std::sync::Arc;

use super::spec::Spec;
use super::{
    cache, cow, delay, error, flakey, log, offset, rate, readonly, stats, truncate, FilterError,
};
use crate::target::{Target, MAX_FILTER_LAYERS};

/// Settings the embedding program supplies for options a spec leaves out.
#[derive(Debug, Clone, Default)]
pub struct Env {
    /// Where the outermost `stats` filter without `file=` writes its
    /// snapshots (the CLI's: a file in the state directory, for `userblk stats`).
    pub stats_file: Option<PathBuf>,
    /// Where filters offer their control actions (`flakey`'s `powercut`),
    /// for the program to serve ([`crate::control::Server`]).
    pub control: crate::control::Registry,
}

/// A parsed filter: what [`build`] checks before opening anything.
#[derive(Debug, Clone)]
pub enum Config {
    /// [`readonly`].
    ReadOnly,
    /// [`offset`].
    Offset(offset::Config),
    /// [`truncate`].
    Truncate(truncate::Config),
    /// [`delay`].
    Delay(delay::Config),
    /// [`error`].
    Error(error::Config),
    /// [`rate`].
    Rate(rate::Config),
    /// [`log`].
    Log(log::Config),
    /// [`stats`].
    Stats(stats::Config),
    /// [`cow`].
    Cow(cow::Config),
    /// [`cache`].
    Cache(cache::Config),
    /// [`flakey`].
    Flakey(flakey::Config),
}

impl Config {
    /// Parse and check a spec's options (nothing is opened yet), by the
    /// filter's entry in the table ([`super::table::FILTERS`]).
    pub fn parse(spec: &Spec) -> Result<Config, FilterError> {
        match super::table::lookup(spec.name()) {
            Some(entry) => (entry.parse)(spec),
            None => Err(FilterError::UnknownFilter {
                name: spec.name().to_string(),
            }),
        }
    }

    /// Put this filter over `inner`, with what `env` supplies.
    pub fn wrap(self, inner: Arc<dyn Target>, env: &Env) -> Result<Arc<dyn Target>, FilterError> {
        Ok(match self {
            Config::ReadOnly => Arc::new(readonly::ReadOnly::new(inner)?),
            Config::Offset(c) => Arc::new(offset::Offset::new(inner, c)?),
            Config::Truncate(c) => Arc::new(truncate::Truncate::new(inner, c)?),
            Config::Delay(c) => Arc::new(delay::Delay::new(inner, c)?),
            Config::Error(c) => Arc::new(error::ErrorFilter::new(inner, c)?),
            Config::Rate(c) => Arc::new(rate::Rate::new(inner, c)?),
            Config::Log(c) => Arc::new(log::Log::new(inner, c)?),
            Config::Stats(c) => Arc::new(stats::Stats::new(inner, c)?),
            Config::Cow(c) => Arc::new(cow::Cow::new(inner, c)?),
            Config::Cache(c) => Arc::new(cache::Cache::new(inner, c)?),
            Config::Flakey(c) => Arc::new(flakey::Flakey::new(inner, c, &env.control)?),
        })
    }
}

/// Check specs without building anything: for a command line, before a
/// daemon starts.
pub fn check(specs: &[Spec]) -> Result<(), FilterError> {
    if specs.len() > usize::from(MAX_FILTER_LAYERS) {
        return Err(FilterError::TooDeep);
    }
    specs.iter().try_for_each(|s| Config::parse(s).map(drop))
}

/// Stack the filters of `specs` over `target`: the first spec ends up
/// outermost (nearest the frontend), the last right over the target.
/// Every spec is checked before any filter opens a file or a socket.
///
/// ```
/// use std::sync::Arc;
/// use userblk::filters::{build, Env, Spec};
/// use userblk::targets::NullTarget;
/// use userblk::Target;
///
/// let specs: Vec<Spec> = ["readonly", "offset:offset=1M"]
///     .iter().map(|s| s.parse().unwrap()).collect();
/// let t = build(Arc::new(NullTarget::new(4 << 20)), &specs, &Env::default()).unwrap();
/// assert!(t.caps().read_only);
/// assert_eq!(t.caps().size, 3 << 20);
/// assert_eq!(t.describe()["filters"][1], "offset:offset=1M");
/// ```
pub fn build(
    target: Arc<dyn Target>,
    specs: &[Spec],
    env: &Env,
) -> Result<Arc<dyn Target>, FilterError> {
    check(specs)?;
    let mut configs = specs
        .iter()
        .map(Config::parse)
        .collect::<Result<Vec<_>, _>>()?;
    // The outermost stats filter without a file of its own gets the default.
    let default_stats = configs
        .iter_mut()
        .find(|c| matches!(c, Config::Stats(s) if s.file.is_none()));
    if let Some(Config::Stats(c)) = default_stats {
        c.file.clone_from(&env.stats_file);
    }
    configs
        .into_iter()
        .rev()
        .try_fold(target, |inner, c| c.wrap(inner, env))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::filters::described_filters;
    use crate::targets::NullTarget;

    fn specs(list: &[&str]) -> Vec<Spec> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn stacks_nest_first_outermost() {
        let null: Arc<dyn Target> = Arc::new(NullTarget::new(8 << 20));
        let t = build(
            null,
            &specs(&["stats", "readonly", "offset:offset=1M", "truncate:size=2M"]),
            &Env::default(),
        )
        .unwrap();
        assert_eq!(t.filter_depth(), 4);
        let d = t.describe();
        assert_eq!(d["type"], "null");
        assert_eq!(
            described_filters(&d),
            ["stats", "readonly", "offset:offset=1M", "truncate:size=2M"]
        );
        // truncate (innermost) makes 2M, offset takes 1M off it.
        assert_eq!(t.caps().size, 1 << 20);
        assert!(t.caps().read_only);
    }

    #[test]
    fn the_default_stats_file_goes_to_the_outermost_stats_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let (own, default) = (dir.path().join("own.json"), dir.path().join("default.json"));
        let env = Env {
            stats_file: Some(default.clone()),
            ..Env::default()
        };
        let null: Arc<dyn Target> = Arc::new(NullTarget::new(1 << 20));
        let own_spec = format!("stats:file={}", own.display());
        let t = build(null, &specs(&[&own_spec, "readonly", "stats"]), &env).unwrap();
        let filters = described_filters(&t.describe());
        assert_eq!(filters[0], own_spec);
        assert_eq!(filters[2], format!("stats:file={}", default.display()));
        assert!(own.exists() && default.exists());
    }

    #[test]
    fn bad_specs_fail_before_anything_is_built() {
        let null: Arc<dyn Target> = Arc::new(NullTarget::new(8 << 20));
        let e = build(null.clone(), &specs(&["stats", "nope"]), &Env::default())
            .err()
            .unwrap();
        assert!(e
            .to_string()
            .starts_with("unknown filter 'nope' (known: readonly,"));
        let e = check(&specs(&["delay:read=fast"])).err().unwrap();
        assert!(e.to_string().contains("delay: read=fast"), "{e}");
        // A misspelt required key is reported as misspelt, not as missing.
        let e = check(&specs(&["truncate:sise=1G"])).err().unwrap();
        assert!(
            e.to_string()
                .contains("unknown option 'sise' (known: size)"),
            "{e}"
        );
        let e = check(&specs(&["truncate"])).err().unwrap();
        assert_eq!(e.to_string(), "filter truncate: needs size=...");
        let e = check(&specs(&["readonly:x=1"])).err().unwrap();
        assert!(e.to_string().contains("it takes no options"), "{e}");
        let many: Vec<Spec> = (0..=MAX_FILTER_LAYERS)
            .map(|_| Spec::new("readonly"))
            .collect();
        assert!(matches!(check(&many), Err(FilterError::TooDeep)));
    }
}
