//! Our declarations of librados and librbd against the installed header:
//! a generated C file with one `_Static_assert` per function (its type,
//! built from the Rust declaration, must be the header's) and per constant,
//! compiled with `cc`. Skipped visibly without the header (librbd-dev);
//! under CI=true, which installs it, that is a failure.
#![allow(clippy::unwrap_used)]

#[path = "../../userblk/tests/skip/mod.rs"]
mod skip;

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use userblk_rbd::ffi;

const HEADER: &str = "/usr/include/rbd/librbd.h";

fn c_source() -> String {
    let mut c = String::from(
        "#include <stddef.h>\n#include <stdint.h>\n#include <rados/librados.h>\n#include <rbd/librbd.h>\n",
    );
    let protos = ffi::prototypes()
        .into_iter()
        .chain(ffi::optional_prototypes());
    for (name, ty) in protos {
        writeln!(
            c,
            "_Static_assert(__builtin_types_compatible_p(__typeof__(&{name}), {ty}), \"{name}: not {ty}\");"
        )
        .unwrap();
    }
    for (expr, value) in ffi::CONSTANTS {
        writeln!(
            c,
            "_Static_assert(({expr}) == {value}, \"{expr} != {value}\");"
        )
        .unwrap();
    }
    c
}

fn compile(src: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("check.c");
    std::fs::write(&file, src).unwrap();
    Command::new("cc")
        .args(["-std=gnu11", "-fsyntax-only", "-Werror"])
        .arg(&file)
        .output()
        .unwrap()
}

#[test]
fn declarations_match_the_header() {
    if !skip::require(
        Path::new(HEADER).exists(),
        skip::Prereq::CiInstalls,
        "no /usr/include/rbd/librbd.h (apt-get install librbd-dev)",
    ) {
        return;
    }
    let src = c_source();
    let out = compile(&src);
    assert!(
        out.status.success(),
        "{}\n--- generated ---\n{src}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every declaration is checked, none forgotten.
    assert_eq!(
        src.matches("_Static_assert").count(),
        ffi::prototypes().len() + 1 + ffi::CONSTANTS.len()
    );
}

#[test]
fn a_wrong_declaration_fails_the_check() {
    if !skip::require(
        Path::new(HEADER).exists(),
        skip::Prereq::CiInstalls,
        "no /usr/include/rbd/librbd.h (apt-get install librbd-dev)",
    ) {
        return;
    }
    // rbd_aio_read's length is size_t, not int: the check must catch it.
    let bad = "#include <rbd/librbd.h>\n_Static_assert(__builtin_types_compatible_p(__typeof__(&rbd_aio_read), int (*)(rbd_image_t, uint64_t, int, char *, rbd_completion_t)), \"x\");\n";
    assert!(!compile(bad).status.success());
}
