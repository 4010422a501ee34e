//! Whatever the narinfo parser accepts must survive a render and parse unchanged:
//! the server re-renders stored narinfos, so a value that shifts on the way
//! through would change what (and whether) clients verify.

#![no_main]

use garret_nix::narinfo::NarInfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(info) = text.parse::<NarInfo>() else {
        return;
    };
    assert_eq!(info.validate(), Ok(()), "{text:?}");
    let rendered = info.to_string();
    assert_eq!(
        rendered.parse::<NarInfo>(),
        Ok(info),
        "{text:?} rendered as {rendered:?}"
    );
});
