//! Configuration parsing: any TOML document is parsed and validated without a panic, and a valid
//! configuration survives a round trip through `--print-config`'s TOML.

#![no_main]

use kvtier_daemon::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = Config::from_toml(text) else { return };
    if config.validate().is_ok() {
        let again = Config::from_toml(&config.to_toml()).expect("printed configuration parses");
        assert_eq!(again, config);
    }
});
