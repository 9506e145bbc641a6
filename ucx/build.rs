//! Generates bindings of `<ucp/api/ucp.h>` (Debian `libucx-dev`) with bindgen and links libucp and
//! libucs. The status type comes out as the C compiler sees it: `ucs_status_t` is a packed enum,
//! one signed byte (crates that read it as 32 bits crash on their first call).

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    let bindings = bindgen::Builder::default()
        .header("wrapper.h")
        .allowlist_function("ucp_.*|ucs_status_string")
        .allowlist_type("ucp_.*|ucs_status_t|ucs_thread_mode_t")
        .allowlist_var("UCP_.*|UCS_.*")
        .layout_tests(false)
        .generate()
        .expect("bindgen over <ucp/api/ucp.h>: install libucx-dev and libclang-dev (scripts/test does)");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    bindings.write_to_file(out.join("ucp.rs")).expect("write bindings");
    println!("cargo:rustc-link-lib=ucp");
    println!("cargo:rustc-link-lib=ucs");
}
