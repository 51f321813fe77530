//! The pool file: one `[[device]]` table per device, each turned into the
//! command line `add` would get and checked by `add`'s own parser, so
//! that every `add` option works in a pool file and no second schema can
//! drift from it. The whole file is checked before anything changes.

use std::collections::BTreeMap;
use std::path::Path;

use clap::{CommandFactory, Parser};

use crate::cli::{AddArgs, Cli, Command};
use crate::exit::{Coded, USAGE};

/// One device of the file.
#[derive(Debug)]
pub struct Device {
    /// Its name (unique in the file).
    pub name: String,
    /// The `add` command line, without `add`: target first, `--name` last.
    pub argv: Vec<String>,
    /// That command line, parsed.
    pub args: AddArgs,
}

/// Options that say how one `add` runs, not what the device is: `apply`
/// runs the devices itself.
const NOT_IN_A_FILE: [&str; 5] = ["show", "foreground", "adopt", "recover-id", "name"];

/// Read and check the pool file at `path`. Any fault is one line naming
/// the file, the device (index from 1, and name) and the key, with exit
/// status 2.
pub fn read(path: &Path) -> anyhow::Result<Vec<Device>> {
    let shown = path.display().to_string();
    let bad = |msg: String| {
        anyhow::Error::new(Coded {
            status: USAGE,
            msg: format!("{shown}: {msg}"),
        })
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    parse(&text).map_err(bad)
}

/// The devices `text` (a pool file) lists, or what is wrong with it.
pub fn parse(text: &str) -> Result<Vec<Device>, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let before = e
            .span()
            .and_then(|s| text.get(..s.start))
            .unwrap_or_default();
        let line = before.matches('\n').count() + 1;
        format!("line {line}: {}", e.message().trim())
    })?;
    let mut tables = Vec::new();
    for (key, value) in &table {
        match (key.as_str(), value) {
            ("device", toml::Value::Array(items)) => tables = items.clone(),
            ("device", _) => return Err("device must be [[device]] tables".into()),
            (other, _) => {
                return Err(format!(
                    "unknown key {other:?} (a pool file has only [[device]] tables)"
                ))
            }
        }
    }
    let mut devices: Vec<Device> = Vec::new();
    for (i, item) in tables.iter().enumerate() {
        let index = i + 1;
        let toml::Value::Table(t) = item else {
            return Err(format!("device {index}: device must be [[device]] tables"));
        };
        let d = device(t).map_err(|e| {
            let name = t.get("name").and_then(toml::Value::as_str);
            match name {
                Some(n) => format!("device {index} ({n}): {e}"),
                None => format!("device {index}: {e}"),
            }
        })?;
        if let Some(first) = devices.iter().position(|o| o.name == d.name) {
            return Err(format!(
                "device {index} ({}): name {} is also device {}'s",
                d.name,
                d.name,
                first + 1
            ));
        }
        let id = d.args.dev.id;
        if let Some(other) = devices.iter().find(|o| id.is_some() && o.args.dev.id == id) {
            return Err(format!(
                "device {index} ({}): key number: {} is also {}'s",
                d.name,
                id.unwrap_or_default(),
                other.name
            ));
        }
        devices.push(d);
    }
    Ok(devices)
}

/// One `[[device]]` table to its `add` command line, parsed.
fn device(t: &toml::Table) -> Result<Device, String> {
    let name = match t.get("name") {
        Some(toml::Value::String(n)) => n.clone(),
        Some(_) => return Err("key name: must be a string".into()),
        None => return Err("key name is missing".into()),
    };
    userblk::names::validate(&name).map_err(|e| format!("key name: {e}"))?;
    let cli = Cli::command();
    let add = cli.find_subcommand("add").ok_or("no add command (a bug)")?;
    let target_name = match t.get("target") {
        Some(toml::Value::String(n)) => n.clone(),
        Some(_) => return Err("key target: must be a string".into()),
        None => return Err("key target is missing".into()),
    };
    let Some(target) = add
        .find_subcommand(&target_name)
        .filter(|c| !c.is_hide_set())
    else {
        let known: Vec<&str> = add
            .get_subcommands()
            .filter(|c| !c.is_hide_set())
            .map(clap::Command::get_name)
            .collect();
        return Err(format!(
            "key target: unknown target {target_name:?} (one of {})",
            known.join(", ")
        ));
    };
    let mut argv = vec![target_name.clone()];
    // By option name, so that `io_buf_size` and `io-buf-size` given both
    // are one option given twice.
    let mut seen = BTreeMap::new();
    for (key, value) in t {
        if key == "name" || key == "target" {
            continue;
        }
        let long = key.replace('_', "-");
        let arg = target
            .get_arguments()
            .chain(add.get_arguments())
            .find(|a| a.get_long() == Some(long.as_str()) && !a.is_hide_set())
            .filter(|_| !NOT_IN_A_FILE.contains(&long.as_str()))
            .ok_or_else(|| {
                format!("unknown key {key:?} (not an option of `userblk add {target_name}`)")
            })?;
        if let Some(other) = seen.insert(long.clone(), key.clone()) {
            return Err(format!("keys {other:?} and {key:?} are one option"));
        }
        option(&mut argv, arg, &long, value).map_err(|e| format!("key {key}: {e}"))?;
    }
    argv.push(format!("--name={name}"));
    let full = ["userblk", "add"]
        .into_iter()
        .map(String::from)
        .chain(argv.iter().cloned());
    let args = match Cli::try_parse_from(full) {
        Ok(Cli {
            command: Command::Add(a),
            ..
        }) => *a,
        Ok(_) => return Err("not an add command line (a bug)".into()),
        Err(e) => return Err(crate::cli::error_line(&e)),
    };
    Ok(Device { name, argv, args })
}

/// Append option `long` with the TOML `value` to `argv`: `true` is the
/// flag, `false` leaves it out, a list repeats an option that repeats.
/// Values go as `--long=VALUE`, so that one starting with `-` stays a value.
fn option(
    argv: &mut Vec<String>,
    arg: &clap::Arg,
    long: &str,
    value: &toml::Value,
) -> Result<(), String> {
    let takes_value = arg.get_action().takes_values();
    let repeats = matches!(arg.get_action(), clap::ArgAction::Append);
    match value {
        toml::Value::Boolean(b) if !takes_value => {
            if *b {
                argv.push(format!("--{long}"));
            }
            Ok(())
        }
        _ if !takes_value => Err("a flag: true or false".into()),
        toml::Value::Array(items) if repeats => {
            for item in items {
                argv.push(format!("--{long}={}", scalar(item)?));
            }
            Ok(())
        }
        toml::Value::Array(_) => Err("takes one value, not a list".into()),
        v => {
            argv.push(format!("--{long}={}", scalar(v)?));
            Ok(())
        }
    }
}

/// A string, number or boolean as the command line writes it.
fn scalar(v: &toml::Value) -> Result<String, String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        _ => Err("must be a string, a number or a boolean".into()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn error(text: &str) -> String {
        parse(text).err().unwrap()
    }

    #[test]
    fn tables_become_add_command_lines() {
        let d = parse(
            r#"
            [[device]]
            name = "db"
            target = "mem"
            size = "64M"
            frontend = "fuse"
            queues = 2
            filter = ["stats", "delay:read=5ms"]
            loop = true
            no_loop = false

            [[device]]
            name = "img"
            target = "loop"
            file = "-odd"
            "#,
        )
        .unwrap();
        assert_eq!(
            d[0].argv,
            [
                "mem",
                "--filter=stats",
                "--filter=delay:read=5ms",
                "--frontend=fuse",
                "--loop",
                "--queues=2",
                "--size=64M",
                "--name=db"
            ]
        );
        assert_eq!(d[0].args.dev.queues, Some(2));
        assert_eq!(d[0].args.filters().len(), 2);
        assert_eq!(d[1].argv, ["loop", "--file=-odd", "--name=img"]);
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn faults_name_the_device_and_the_key() {
        let one = "[[device]]\nname = \"a\"\ntarget = \"mem\"\nsize = \"1M\"\n";
        let twice = format!("{one}{one}");
        for (text, says) in [
            ("[[device]]\nname = \"a\"\ntarget = \"mem\"\nsise = \"1M\"\n", "device 1 (a): unknown key \"sise\""),
            (twice.as_str(), "device 2 (a): name a is also device 1's"),
            ("[[device]]\nname = \"a\"\ntarget = \"mem\"\nsize = \"12Q\"\n", "device 1 (a): invalid value '12Q' for '--size"),
            ("[[device]]\nname = \"a\"\nsize = \"1M\"\n", "device 1 (a): key target is missing"),
            ("[[device]]\ntarget = \"mem\"\n", "device 1: key name is missing"),
            ("[[device]]\nname = \"a\"\ntarget = \"tape\"\n", "unknown target \"tape\""),
            ("[[device]]\nname = \"a/b\"\ntarget = \"null\"\n", "key name: "),
            ("[[device]]\nname = \"a\"\ntarget = \"null\"\nforeground = true\n", "unknown key \"foreground\""),
            ("[[device]]\nname = \"a\"\ntarget = \"null\"\nrecovery = \"yes\"\n", "key recovery: a flag"),
            ("[[device]]\nname = \"a\"\ntarget = \"null\"\nqueues = [1, 2]\n", "key queues: takes one value"),
            ("[[device]]\nname = \"a\"\ntarget = \"mem\"\n", "--size <SIZE>"),
            ("[[device]]\nname = \"a\"\ntarget = \"null\"\nio_buf_size = \"4K\"\nio-buf-size = \"4K\"\n", "are one option"),
            ("[device]\nname = \"a\"\n", "[[device]] tables"),
            ("pool = 1\n", "unknown key \"pool\""),
            ("[[device]]\nname = \"a\"\n\nsize = \n", "line 4: "),
        ] {
            let e = error(text);
            assert!(e.contains(says), "{text:?}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        let two = "[[device]]\nname = \"a\"\ntarget = \"null\"\nnumber = 3\n[[device]]\nname = \"b\"\ntarget = \"null\"\nnumber = 3\n";
        assert!(error(two).contains("key number: 3 is also a's"));
    }
}
