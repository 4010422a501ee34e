//! Arbitrary bytes must never panic the decoder, and where the input is cut
//! must not change what it reports: the server sees uploads cut at random.

#![no_main]

use garret_nix::nar::{Decoder, NarError, Visitor};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq, Eq)]
enum Event {
    Directory,
    Entry(Vec<u8>),
    EntryEnd,
    File(bool, u64),
    FileData(Vec<u8>),
    FileEnd,
    Symlink(Vec<u8>),
    DirectoryEnd,
}

/// Visitor events, with consecutive file data merged so that traces of
/// differently cut input compare equal.
#[derive(Debug, Default)]
struct Trace(Vec<Event>);

impl Visitor for Trace {
    fn directory(&mut self) {
        self.0.push(Event::Directory);
    }
    fn entry(&mut self, name: &[u8]) {
        self.0.push(Event::Entry(name.to_vec()));
    }
    fn entry_end(&mut self) {
        self.0.push(Event::EntryEnd);
    }
    fn file(&mut self, executable: bool, size: u64) {
        self.0.push(Event::File(executable, size));
    }
    fn file_data(&mut self, data: &[u8]) {
        assert!(!data.is_empty());
        match self.0.last_mut() {
            Some(Event::FileData(previous)) => previous.extend_from_slice(data),
            _ => self.0.push(Event::FileData(data.to_vec())),
        }
    }
    fn file_end(&mut self) {
        self.0.push(Event::FileEnd);
    }
    fn symlink(&mut self, target: &[u8]) {
        self.0.push(Event::Symlink(target.to_vec()));
    }
    fn directory_end(&mut self) {
        self.0.push(Event::DirectoryEnd);
    }
}

fn decode(pieces: &[&[u8]]) -> (Vec<Event>, Result<(), NarError>) {
    let mut decoder = Decoder::new();
    let mut trace = Trace::default();
    for piece in pieces {
        if let Err(error) = decoder.feed(piece, &mut trace) {
            return (trace.0, Err(error));
        }
    }
    let result = decoder.finish();
    (trace.0, result)
}

fuzz_target!(|data: &[u8]| {
    // The first two bytes choose where to cut the rest.
    let Some((cut, nar)) = data.split_first_chunk::<2>() else {
        return;
    };
    let cut = usize::from(u16::from_le_bytes(*cut)) % (nar.len() + 1);
    let (head, tail) = nar.split_at(cut);
    assert_eq!(decode(&[nar]), decode(&[head, tail]));
});
