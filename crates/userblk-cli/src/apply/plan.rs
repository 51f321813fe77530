//! What `apply` will do: the devices the pool file wants against those
//! that run, compared in one canonical form of their `add` arguments.
//! Pure: no device, file or process is looked at here.

use std::collections::{BTreeMap, BTreeSet};

use crate::cli::AddArgs;

/// A device's `add` arguments as `apply` compares them: every option as
/// clap parsed it (defaults filled in, sizes in bytes, `loop` as `file`),
/// so two spellings of one device are equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Canon {
    /// The target's name.
    pub target: String,
    /// The value of the target's size option (null, mem, s3), in bytes.
    pub size: Option<u64>,
    /// The device id asked for (`number`).
    pub id: Option<u32>,
    /// Every other option that shapes the device: clap's field name and
    /// its parsed value, written out.
    pub options: BTreeMap<String, String>,
}

/// Options that say how `add` runs, not what the device is; `name` is
/// what devices are matched by, `id` is compared on its own (a device
/// added without one still has one).
const NOT_COMPARED: [&str; 6] = ["id", "name", "show", "foreground", "adopt", "recover_id"];

impl Canon {
    /// The canonical form of parsed `add` arguments.
    pub fn of(args: &AddArgs) -> Canon {
        let mut options: BTreeMap<String, String> = debug_fields(&format!("{:?}", args.dev))
            .into_iter()
            .filter(|(k, _)| !NOT_COMPARED.contains(&k.as_str()))
            .collect();
        let target = format!("{:?}", args.target);
        let variant = target.split('(').next().unwrap_or_default();
        let mut size = None;
        for (k, v) in debug_fields(&target) {
            match k.as_str() {
                // Every filter, before and after the target name, below.
                "filters" => {}
                "size" => size = parse_size(&v),
                _ => {
                    options.insert(k, v);
                }
            }
        }
        let filters: Vec<String> = args.filters().iter().map(ToString::to_string).collect();
        options.insert("filters".into(), format!("{filters:?}"));
        Canon {
            target: variant.to_ascii_lowercase(),
            size,
            id: args.dev.id,
            options,
        }
    }
}

/// `67108864` or `Some(67108864)` (s3's optional size) to bytes.
fn parse_size(v: &str) -> Option<u64> {
    let v = v
        .strip_prefix("Some(")
        .and_then(|v| v.strip_suffix(')'))
        .unwrap_or(v);
    v.parse().ok()
}

/// The fields of a struct as `{:?}` writes it (`Name { a: 1, b: Some("x") }`,
/// or a tuple variant around one): name and value, split at the commas
/// that are not inside a value.
fn debug_fields(text: &str) -> Vec<(String, String)> {
    let (Some(open), Some(close)) = (text.find('{'), text.rfind('}')) else {
        return Vec::new();
    };
    let inner = text.get(open + 1..close).unwrap_or_default();
    let mut parts = Vec::new();
    let (mut depth, mut in_str, mut escaped, mut start) = (0i32, false, false, 0);
    for (i, c) in inner.char_indices() {
        if in_str {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter_map(|p| p.trim().split_once(": "))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// One option whose value the file and the running device disagree on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Difference {
    /// The option (clap's field name; `daemon` for a daemon that is not running).
    pub option: String,
    /// What the running device has.
    pub running: String,
    /// What the file says.
    pub file: String,
}

/// What `apply` does about one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The file lists it and nothing runs under its name.
    Add,
    /// It runs as the file says.
    Keep,
    /// Only its size differs, and the file's is larger: `resize`.
    Grow { from: u64, to: u64 },
    /// It runs otherwise than the file says; left alone (no `--recreate`).
    Differs(Vec<Difference>),
    /// It runs otherwise than the file says: deleted and added again.
    Recreate(Vec<Difference>),
    /// `apply` added it earlier and the file no longer lists it.
    Delete,
}

impl Action {
    /// The word a plan line starts with.
    pub fn word(&self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Keep => "keep",
            Action::Grow { .. } => "grow",
            Action::Differs(_) => "differs",
            Action::Recreate(_) => "recreate",
            Action::Delete => "delete",
        }
    }
}

/// One device of the plan: its name, its id if it runs, what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The device's name.
    pub name: String,
    /// The running device's id.
    pub id: Option<u32>,
    /// What to do.
    pub action: Action,
}

/// A running device that has a name, as the plan sees it.
#[derive(Debug, Clone)]
pub struct Running {
    /// Its name.
    pub name: String,
    /// Its id.
    pub id: u32,
    /// Its daemon's pid.
    pub pid: i32,
    /// Whether its daemon runs.
    pub alive: bool,
    /// Its saved `add` arguments, canonical, or why they do not parse.
    pub canon: Result<Canon, String>,
}

/// The plan: deletions first (they free names, ids and resources), then
/// the file's devices in its order. `managed` are the names `apply` added
/// before: only those are deleted when the file drops them; a device
/// with no name, or one added by hand, is never touched unless the file
/// names it.
pub fn plan(
    wanted: &[(String, Canon)],
    running: &[Running],
    managed: &BTreeSet<String>,
    recreate: bool,
) -> Vec<Step> {
    let mut steps: Vec<Step> = running
        .iter()
        .filter(|r| managed.contains(&r.name) && !wanted.iter().any(|(n, _)| *n == r.name))
        .map(|r| Step {
            name: r.name.clone(),
            id: Some(r.id),
            action: Action::Delete,
        })
        .collect();
    steps.sort_by(|a, b| a.name.cmp(&b.name));
    for (name, want) in wanted {
        let step = match running.iter().find(|r| r.name == *name) {
            None => Step {
                name: name.clone(),
                id: None,
                action: Action::Add,
            },
            Some(have) => Step {
                name: name.clone(),
                id: Some(have.id),
                action: compare(want, have, recreate),
            },
        };
        steps.push(step);
    }
    steps
}

/// What to do about `have`, which runs under the name the file gives `want`.
fn compare(want: &Canon, have: &Running, recreate: bool) -> Action {
    let mut diffs = Vec::new();
    let diff = |option: &str, running: String, file: String| Difference {
        option: option.into(),
        running,
        file,
    };
    let size_of = |s: Option<u64>| s.map_or("none".into(), |s| s.to_string());
    match &have.canon {
        _ if !have.alive => diffs.push(diff(
            "daemon",
            format!("not running (pid {})", have.pid),
            "running".into(),
        )),
        Err(why) => diffs.push(diff("add arguments", why.clone(), "readable".into())),
        Ok(canon) => {
            if canon.target != want.target {
                diffs.push(diff("target", canon.target.clone(), want.target.clone()));
            }
            if let Some(id) = want.id.filter(|&id| id != have.id) {
                diffs.push(diff("number", have.id.to_string(), id.to_string()));
            }
            let keys: BTreeSet<&String> = canon.options.keys().chain(want.options.keys()).collect();
            for k in keys {
                let (r, f) = (canon.options.get(k), want.options.get(k));
                if r != f {
                    let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "-".into());
                    diffs.push(diff(k, show(r), show(f)));
                }
            }
            match (canon.size, want.size) {
                (from, to) if from == to => {}
                (Some(from), Some(to)) if to > from && diffs.is_empty() => {
                    return Action::Grow { from, to }
                }
                (from, to) => diffs.push(diff("size", size_of(from), size_of(to))),
            }
        }
    }
    match diffs {
        d if d.is_empty() => Action::Keep,
        d if recreate => Action::Recreate(d),
        d => Action::Differs(d),
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
