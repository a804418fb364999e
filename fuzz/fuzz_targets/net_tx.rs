#![no_main]
//! See `vhost_devices_fuzz::targets::net_tx` for what the input drives.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vhost_devices_fuzz::targets::net_tx(data));
