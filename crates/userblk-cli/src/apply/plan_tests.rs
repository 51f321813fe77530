//! The plan as a pure function: the file's devices against running ones.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use clap::Parser;

use super::*;
use crate::cli::{Cli, Command};

fn canon(argv: &str) -> Canon {
    let argv = ["userblk", "add"]
        .into_iter()
        .chain(argv.split_whitespace());
    match Cli::try_parse_from(argv).unwrap().command {
        Command::Add(a) => Canon::of(&a),
        other => panic!("parsed as {other:?}"),
    }
}

fn running(name: &str, id: u32, argv: &str) -> Running {
    Running {
        name: name.into(),
        id,
        pid: 100 + i32::try_from(id).unwrap(),
        alive: true,
        canon: Ok(canon(argv)),
    }
}

fn wanted(list: &[(&str, &str)]) -> Vec<(String, Canon)> {
    list.iter()
        .map(|(n, a)| ((*n).to_string(), canon(a)))
        .collect()
}

fn managed(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_string()).collect()
}

fn actions(steps: &[Step]) -> Vec<(&str, &str)> {
    steps
        .iter()
        .map(|s| (s.name.as_str(), s.action.word()))
        .collect()
}

#[test]
fn one_device_spelled_two_ways_is_kept() {
    let pairs = [
        (
            "mem -s 64M --frontend fuse",
            "--frontend=fuse mem --size=67108864",
        ),
        (
            "--filter stats null --filter delay:read=5ms",
            "null --filter=stats --filter=delay:read=5ms",
        ),
        (
            "loop -f /x --offset 4K",
            "file --file=/x --offset=4096 --depth=128",
        ),
        ("-n 3 mem -s 1M", "mem -s 1M"),
    ];
    for (have, want) in pairs {
        let steps = plan(
            &wanted(&[("a", want)]),
            &[running("a", 3, have)],
            &managed(&[]),
            false,
        );
        assert_eq!(actions(&steps), [("a", "keep")], "{have} / {want}");
    }
}

#[test]
fn missing_devices_are_added_and_only_managed_ones_deleted() {
    let run = [
        running("old", 1, "mem -s 1M"),
        running("by-hand", 2, "mem -s 1M"),
        running("kept", 3, "null"),
    ];
    let want = wanted(&[("kept", "null"), ("new", "mem -s 2M")]);
    let steps = plan(&want, &run, &managed(&["old", "kept"]), false);
    assert_eq!(
        actions(&steps),
        [("old", "delete"), ("kept", "keep"), ("new", "add")]
    );
    assert_eq!(steps[0].id, Some(1));
    assert_eq!(steps[2].id, None);
    // An empty file deletes what apply made, and nothing else.
    let steps = plan(&[], &run, &managed(&["old", "kept", "gone"]), true);
    assert_eq!(actions(&steps), [("kept", "delete"), ("old", "delete")]);
}

#[test]
fn a_larger_size_alone_grows_anything_else_differs() {
    let run = [running("a", 0, "mem -s 64M --frontend fuse")];
    let grow = plan(
        &wanted(&[("a", "mem -s 128M --frontend fuse")]),
        &run,
        &managed(&[]),
        false,
    );
    assert_eq!(
        grow[0].action,
        Action::Grow {
            from: 64 << 20,
            to: 128 << 20
        }
    );
    let shrink = plan(
        &wanted(&[("a", "mem -s 32M --frontend fuse")]),
        &run,
        &managed(&[]),
        false,
    );
    let Action::Differs(d) = &shrink[0].action else {
        panic!("{shrink:?}")
    };
    assert_eq!(d.len(), 1);
    assert_eq!(
        (d[0].option.as_str(), d[0].running.as_str()),
        ("size", "67108864")
    );
    // Larger, but with another change: not a grow.
    let both = plan(
        &wanted(&[("a", "mem -s 128M --frontend nbd")]),
        &run,
        &managed(&[]),
        true,
    );
    let Action::Recreate(d) = &both[0].action else {
        panic!("{both:?}")
    };
    let options: Vec<&str> = d.iter().map(|d| d.option.as_str()).collect();
    assert_eq!(options, ["frontend", "size"]);
}

#[test]
fn a_changed_option_differs_or_is_recreated() {
    let run = [running("f", 5, "file -f /img --frontend fuse")];
    for (want, option) in [
        ("file -f /img --frontend fuse --buffered", "buffered"),
        ("file -f /img --frontend fuse --offset 1M", "offset"),
        ("file -f /other --frontend fuse", "path"),
        ("mem -s 1M --frontend fuse", "target"),
        ("file -f /img --frontend fuse --filter stats", "filters"),
        ("file -f /img --frontend fuse -q 2", "queues"),
        ("-n 6 file -f /img --frontend fuse", "number"),
    ] {
        let w = wanted(&[("f", want)]);
        let steps = plan(&w, &run, &managed(&["f"]), false);
        match &steps[0].action {
            Action::Differs(d) => assert!(d.iter().any(|d| d.option == option), "{want}: {d:?}"),
            other => panic!("{want}: {other:?}"),
        }
        let steps = plan(&w, &run, &managed(&["f"]), true);
        assert_eq!(steps[0].action.word(), "recreate", "{want}");
        assert_eq!(steps[0].id, Some(5));
    }
}

#[test]
fn a_dead_daemon_or_unreadable_arguments_differ() {
    let mut dead = running("a", 0, "mem -s 1M");
    dead.alive = false;
    let steps = plan(
        &wanted(&[("a", "mem -s 1M")]),
        &[dead],
        &managed(&[]),
        false,
    );
    let Action::Differs(d) = &steps[0].action else {
        panic!("{steps:?}")
    };
    assert_eq!(d[0].option, "daemon");
    let mut odd = running("a", 0, "mem -s 1M");
    odd.canon = Err("unexpected argument".into());
    let steps = plan(&wanted(&[("a", "mem -s 1M")]), &[odd], &managed(&[]), true);
    assert_eq!(steps[0].action.word(), "recreate");
}

#[test]
fn debug_fields_split_only_between_fields() {
    let f = debug_fields(r#"X(Y { a: Some("p, q: {r}"), b: [1, 2], c: Z { d: "\"}" }, e: None })"#);
    let keys: Vec<&str> = f.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["a", "b", "c", "e"]);
    assert_eq!(f[0].1, r#"Some("p, q: {r}")"#);
    assert_eq!(f[2].1, r#"Z { d: "\"}" }"#);
    assert!(debug_fields("Unit").is_empty());
    assert_eq!(parse_size("Some(4096)"), Some(4096));
    assert_eq!(parse_size("None"), None);
}
