//! Links libgcc's unwinder into the module statically (`libgcc_eh.a`, which GCC builds
//! position-independent for `-shared -static-libgcc`) instead of loading `libgcc_s.so.1`.
//! sshd and sudo do not load libgcc_s themselves, so a module needing it made every login map
//! one more library and run its constructor, whose CPUID probes trap to the hypervisor on a
//! virtual machine: 0.14-0.20 ms per login, a sixth of the module's whole cost (README.md,
//! Benchmarks). The unwinder stays: a panic is still caught at the FFI edge. Its symbols are
//! not exported (the module exports only the `pam_sm_*` entry points), so it never stands in
//! for a host's own libgcc_s.
//!
//! The archive comes before the standard library's `-lgcc_s` on the link line, so the linker
//! takes `_Unwind_*` from it and `--as-needed` drops libgcc_s.
fn main() {
    println!("cargo:rustc-link-lib=static:-bundle=gcc_eh");
}
