//! Any JSON a user hands cove-vmm as `--config`: parsing and validation never panic, and a config
//! that validates survives a round trip through JSON unchanged.
#![no_main]

use cove_vmm::VmConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(config) = serde_json::from_slice::<VmConfig>(data) else { return };
    if config.validate().is_ok() {
        let text = serde_json::to_string(&config).expect("a valid config serialises");
        let again: VmConfig = serde_json::from_str(&text).expect("and parses back");
        assert_eq!(again, config);
    }
});
