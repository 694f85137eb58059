//! Network files (`crates/protocol/src/network.rs`): the TOML a user imports with
//! `postern account create NAME --network FILE`, often received from someone else.
//!
//! Asserts, for any text: parsing never panics; a file that is accepted has a 32-byte
//! server key and a `host:port`-shaped address; writing it back (`to_toml`, what
//! `postern server init` writes) and reading that gives the same file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_protocol::network::NetworkFile;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = NetworkFile::parse(text, "fuzz.toml") else {
        return;
    };
    let key = file.server_key().expect("an accepted file has a valid key");
    assert!(file.server.address.contains(':'));
    let written = file.to_toml();
    let back = NetworkFile::parse(&written, "written.toml")
        .unwrap_or_else(|e| panic!("written file does not parse: {e}\n{written}"));
    assert_eq!(back, file);
    assert_eq!(back.server_key().ok(), Some(key));
    assert_eq!(
        NetworkFile::new(&file.server.address, &key)
            .server_key()
            .ok(),
        Some(key)
    );
});
