//! Finds the eBPF object built by `cargo xtask build-ebpf` and copies it into OUT_DIR, where
//! `dataplane.rs` embeds it with `aya::include_bytes_aligned!`. The object is located through
//! `$DATAMESH_EBPF_OBJ` or `<workspace>/target/ebpf/datamesh.bpf.o`, never through a relative
//! path baked into the source.

use std::path::PathBuf;

const ENV: &str = "DATAMESH_EBPF_OBJ";

fn main() {
    println!("cargo::rerun-if-env-changed={ENV}");
    let path = match std::env::var_os(ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => {
            let manifest =
                PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
            let root = manifest.parent().map(PathBuf::from).unwrap_or(manifest);
            root.join("target").join("ebpf").join("datamesh.bpf.o")
        }
    };
    println!("cargo::rerun-if-changed={}", path.display());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default()).join("datamesh.bpf.o");
    if !path.is_file() {
        // One line, naming the command that fixes it.
        println!(
            "cargo::error=eBPF object not found at {}: run `cargo xtask build-ebpf` first",
            path.display()
        );
        return;
    }
    if let Err(e) = std::fs::copy(&path, &out) {
        println!(
            "cargo::error=cannot copy eBPF object {} to {}: {e}",
            path.display(),
            out.display()
        );
    }
}
