#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| trustbroker::fuzzing::xml_plist(data));
