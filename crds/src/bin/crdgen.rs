//! Writes the Weir CRD manifests, generated from the Rust types, into every
//! folder given (default: `crds/` and `charts/weir/crds/` under the current
//! directory). With `--check` it writes nothing and fails when a file differs.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut check = false;
    let mut dirs: Vec<PathBuf> = Vec::new();
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--check" => check = true,
            "-h" | "--help" => {
                eprintln!(
                    "usage: crdgen [--check] [DIR...]   (default DIRs: crds charts/weir/crds)"
                );
                return ExitCode::SUCCESS;
            }
            dir => dirs.push(PathBuf::from(dir)),
        }
    }
    if dirs.is_empty() {
        dirs = vec![PathBuf::from("crds"), PathBuf::from("charts/weir/crds")];
    }
    let mut stale = Vec::new();
    for crd in weir_crds::all() {
        let text = match weir_crds::render(&crd) {
            Ok(text) => text,
            Err(err) => {
                eprintln!("crdgen: {err}");
                return ExitCode::FAILURE;
            }
        };
        for dir in &dirs {
            let path = dir.join(weir_crds::file_name(&crd));
            let current = std::fs::read_to_string(&path).unwrap_or_default();
            if current == text {
                continue;
            }
            if check {
                stale.push(path.display().to_string());
            } else if let Err(err) =
                std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, &text))
            {
                eprintln!("crdgen: writing {}: {err}", path.display());
                return ExitCode::FAILURE;
            } else {
                eprintln!("crdgen: wrote {}", path.display());
            }
        }
    }
    if !stale.is_empty() {
        eprintln!(
            "crdgen: out of date (run `cargo run -p weir-crds --bin crdgen`): {}",
            stale.join(", ")
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
