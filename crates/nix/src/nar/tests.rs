//! Reader and writer tests together, since they share one grammar: every
//! rejection with its exact error, and round trips through both.

use std::collections::BTreeMap;
use std::io;

use proptest::prelude::*;

use super::wire::{self, MAGIC, MAX_DEPTH, MAX_NAME_LEN, MAX_TARGET_LEN, MAX_TOKEN_LEN};
use super::*;

/// A file system tree in memory; `BTreeMap` keeps entries in NAR order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    File { executable: bool, contents: Vec<u8> },
    Symlink(Vec<u8>),
    Directory(Entries),
}

/// Visitor events, with consecutive file data merged so that traces from
/// differently split input compare equal.
#[derive(Debug, Clone, PartialEq, Eq)]
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

#[derive(Debug, Default)]
struct Recorder(Vec<Event>);

impl Visitor for Recorder {
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
        assert!(!data.is_empty(), "empty file_data call");
        if let Some(Event::FileData(previous)) = self.0.last_mut() {
            previous.extend_from_slice(data);
        } else {
            self.0.push(Event::FileData(data.to_vec()));
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

type Entries = BTreeMap<Vec<u8>, Node>;

/// Rebuilds a [`Node`] tree, asserting that events nest properly.
#[derive(Debug, Default)]
struct Rebuild {
    /// Open directories, each with the entry name it was opened under.
    dirs: Vec<(Option<Vec<u8>>, Entries)>,
    /// The name of the entry whose node is being read.
    name: Option<Vec<u8>>,
    file: Option<(bool, u64, Vec<u8>)>,
    root: Option<Node>,
}

impl Rebuild {
    fn place(&mut self, node: Node) {
        match self.dirs.last_mut() {
            Some((_, entries)) => {
                let name = self
                    .name
                    .take()
                    .expect("a node inside a directory without an entry");
                assert!(entries.insert(name, node).is_none());
            }
            None => assert!(self.root.replace(node).is_none(), "two root nodes"),
        }
    }
}

impl Visitor for Rebuild {
    fn directory(&mut self) {
        self.dirs.push((self.name.take(), BTreeMap::new()));
    }
    fn entry(&mut self, name: &[u8]) {
        assert!(
            self.name.replace(name.to_vec()).is_none(),
            "entry inside an entry"
        );
    }
    fn entry_end(&mut self) {
        assert!(self.name.is_none(), "entry ended without a node");
    }
    fn file(&mut self, executable: bool, size: u64) {
        self.file = Some((executable, size, Vec::new()));
    }
    fn file_data(&mut self, data: &[u8]) {
        self.file
            .as_mut()
            .expect("file data outside a file")
            .2
            .extend_from_slice(data);
    }
    fn file_end(&mut self) {
        let (executable, size, contents) = self.file.take().expect("file end outside a file");
        assert_eq!(contents.len() as u64, size);
        self.place(Node::File {
            executable,
            contents,
        });
    }
    fn symlink(&mut self, target: &[u8]) {
        self.place(Node::Symlink(target.to_vec()));
    }
    fn directory_end(&mut self) {
        let (name, entries) = self.dirs.pop().expect("directory end outside a directory");
        self.name = name;
        self.place(Node::Directory(entries));
    }
}

/// One wire string, written independently of the writer under test.
fn frame(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(s);
    out.resize(out.len().next_multiple_of(8), 0);
    out
}

fn cat<'a>(a: &[&'a [u8]], b: &[&'a [u8]]) -> Vec<&'a [u8]> {
    [a, b].concat()
}

fn nar(strings: &[&[u8]]) -> Vec<u8> {
    strings.iter().flat_map(|s| frame(s)).collect()
}

/// The offset of the string after `strings`.
fn offset(strings: &[&[u8]]) -> u64 {
    strings.iter().map(|s| frame(s).len() as u64).sum()
}

fn decode(bytes: &[u8]) -> Result<Vec<Event>, NarError> {
    decode_split(bytes, &[])
}

/// Decodes `bytes` fed in pieces cut at `cuts`, which must be sorted.
fn decode_split(bytes: &[u8], cuts: &[usize]) -> Result<Vec<Event>, NarError> {
    let mut decoder = Decoder::new();
    let mut recorder = Recorder::default();
    let mut start = 0;
    for &cut in cuts.iter().chain([&bytes.len()]) {
        decoder.feed(&bytes[start..cut], &mut recorder)?;
        start = cut;
    }
    decoder.finish()?;
    Ok(recorder.0)
}

fn write(node: &Node) -> Vec<u8> {
    let mut writer = NarWriter::new(Vec::new()).unwrap();
    write_node(&mut writer, node).unwrap();
    writer.finish().unwrap()
}

fn write_node(writer: &mut NarWriter<Vec<u8>>, node: &Node) -> io::Result<()> {
    match node {
        Node::File {
            executable,
            contents,
        } => writer.file(*executable, contents.len() as u64, contents.as_slice()),
        Node::Symlink(target) => writer.symlink(target),
        Node::Directory(entries) => {
            writer.directory()?;
            for (name, child) in entries {
                writer.entry(name)?;
                write_node(writer, child)?;
            }
            writer.directory_end()
        }
    }
}

fn rebuild(bytes: &[u8]) -> Node {
    let mut rebuild = Rebuild::default();
    parse(bytes, &mut rebuild).unwrap();
    assert!(rebuild.dirs.is_empty() && rebuild.name.is_none());
    rebuild.root.unwrap()
}

fn nar_error(error: &io::Error) -> &NarError {
    error
        .get_ref()
        .and_then(|e| e.downcast_ref())
        .expect("an io::Error wrapping a NarError")
}

const FILE: &[&[u8]] = &[MAGIC, b"(", b"type", b"regular", b"contents", b"hi", b")"];

fn dir_with(names: &[&[u8]]) -> Vec<u8> {
    let mut strings: Vec<&[u8]> = vec![MAGIC, b"(", b"type", b"directory"];
    for name in names {
        strings.extend_from_slice(&[b"entry", b"(", b"name", name, b"node"]);
        strings.extend_from_slice(&[b"(", b"type", b"symlink", b"target", b"t", b")", b")"]);
    }
    strings.push(b")");
    nar(&strings)
}

#[test]
fn wire_constants() {
    let keywords = [
        wire::OPEN,
        wire::CLOSE,
        wire::TYPE,
        wire::REGULAR,
        wire::EXECUTABLE,
        wire::CONTENTS,
        wire::SYMLINK,
        wire::TARGET,
        wire::DIRECTORY,
        wire::ENTRY,
        wire::NAME,
        wire::NODE,
    ];
    assert_eq!(keywords.iter().map(|k| k.len()).max(), Some(MAX_TOKEN_LEN));
    let framed = [
        wire::framed::OPEN,
        wire::framed::CLOSE,
        wire::framed::TYPE,
        wire::framed::REGULAR,
        wire::framed::EXECUTABLE,
        wire::framed::CONTENTS,
        wire::framed::SYMLINK,
        wire::framed::TARGET,
        wire::framed::DIRECTORY,
        wire::framed::ENTRY,
        wire::framed::NAME,
        wire::framed::NODE,
    ];
    for (keyword, framed) in keywords.iter().zip(framed) {
        assert_eq!(framed, frame(keyword));
        assert_eq!(wire::framed::text(framed), *keyword);
    }
    assert_eq!(wire::framed::MAGIC, frame(MAGIC));
    assert_eq!(wire::framed::EMPTY, frame(b""));
    let padding: Vec<usize> = (0..=16).map(wire::padding_len).collect();
    assert_eq!(padding, [0, 7, 6, 5, 4, 3, 2, 1, 0, 7, 6, 5, 4, 3, 2, 1, 0]);
    assert_eq!(wire::padding_len(u64::MAX), 1);
}

#[test]
fn decodes_each_node_type() {
    assert_eq!(
        decode(&nar(FILE)),
        Ok(vec![
            Event::File(false, 2),
            Event::FileData(b"hi".to_vec()),
            Event::FileEnd
        ])
    );
    let executable = nar(&[
        MAGIC,
        b"(",
        b"type",
        b"regular",
        b"executable",
        b"",
        b"contents",
        b"",
        b")",
    ]);
    assert_eq!(
        decode(&executable),
        Ok(vec![Event::File(true, 0), Event::FileEnd])
    );
    let symlink = nar(&[MAGIC, b"(", b"type", b"symlink", b"target", b"../a", b")"]);
    assert_eq!(decode(&symlink), Ok(vec![Event::Symlink(b"../a".to_vec())]));
    let empty = nar(&[MAGIC, b"(", b"type", b"directory", b")"]);
    assert_eq!(
        decode(&empty),
        Ok(vec![Event::Directory, Event::DirectoryEnd])
    );
}

#[test]
fn entries_sort_bytewise_and_unsigned() {
    // Nix compares `std::string`s, which compare bytes as unsigned chars.
    let names: [&[u8]; 5] = [b"B", b"a", b"a.b", b"ab", b"\xc3\xa9\xff"];
    let events = decode(&dir_with(&names)).unwrap();
    let found: Vec<&[u8]> = events
        .iter()
        .filter_map(|e| {
            if let Event::Entry(name) = e {
                Some(name.as_slice())
            } else {
                None
            }
        })
        .collect();
    assert_eq!(found, names);
}

const REGULAR: &[&[u8]] = &[MAGIC, b"(", b"type", b"regular"];
const SYMLINK: &[&[u8]] = &[MAGIC, b"(", b"type", b"symlink", b"target"];
const NAME: &[&[u8]] = &[MAGIC, b"(", b"type", b"directory", b"entry", b"(", b"name"];

/// `strings` followed by a length prefix no archive could satisfy.
fn absurd(strings: &[&[u8]]) -> Vec<u8> {
    let mut bytes = nar(strings);
    bytes.extend_from_slice(&u64::MAX.to_le_bytes());
    bytes
}

fn unexpected(
    before: &[&[u8]],
    expected: &'static str,
    found: &[u8],
) -> Result<Vec<Event>, NarError> {
    Err(NarError::UnexpectedToken {
        offset: offset(before),
        expected,
        found: found.to_vec(),
    })
}

#[test]
fn rejects_bad_magic() {
    for bytes in [
        nar(&[b"nix-archive-2"]),
        nar(&[b"nix-archive"]),
        absurd(&[]),
        vec![0; 7],
    ] {
        let expected = if bytes.len() < 8 {
            NarError::Truncated { offset: 7 }
        } else {
            NarError::BadMagic
        };
        assert_eq!(decode(&bytes), Err(expected));
    }
}

#[test]
fn rejects_unexpected_tokens() {
    assert_eq!(
        decode(&nar(&[MAGIC, b"type"])),
        unexpected(&[MAGIC], "`(`", b"type")
    );
    assert_eq!(
        decode(&nar(&[MAGIC, b"(", b"regular"])),
        unexpected(&[MAGIC, b"("], "`type`", b"regular")
    );
    assert_eq!(
        decode(&nar(&[MAGIC, b"(", b"type", b"fifo"])),
        unexpected(
            &[MAGIC, b"(", b"type"],
            "`regular`, `symlink` or `directory`",
            b"fifo"
        )
    );
    assert_eq!(
        decode(&nar(&cat(REGULAR, &[b"size"]))),
        unexpected(REGULAR, "`executable` or `contents`", b"size")
    );
    // Nix's parser takes fields in any order, but only one order is canonical.
    assert_eq!(
        decode(&nar(&cat(&FILE[..6], &[b"executable"]))),
        unexpected(&FILE[..6], "`)`", b"executable")
    );
    assert_eq!(
        decode(&nar(&cat(&NAME[..6], &[b"node"]))),
        unexpected(&NAME[..6], "`name`", b"node")
    );
    assert_eq!(
        decode(&absurd(&[MAGIC, b"("])),
        Err(NarError::TokenTooLong {
            offset: offset(&[MAGIC, b"("]),
            expected: "`type`",
            len: u64::MAX
        })
    );
}

#[test]
fn rejects_executable_marker_with_a_value() {
    assert_eq!(
        decode(&nar(&cat(REGULAR, &[b"executable", b"1"]))),
        Err(NarError::ExecutableNotEmpty {
            offset: offset(&cat(REGULAR, &[b"executable"]))
        })
    );
}

#[test]
fn rejects_non_zero_padding() {
    let mut open = frame(b"(");
    open[8 + 3] = 1;
    let bytes = [nar(&[MAGIC]), open].concat();
    assert_eq!(
        decode(&bytes),
        Err(NarError::NonZeroPadding {
            offset: offset(&[MAGIC]) + 9
        })
    );

    let mut contents = frame(b"hi");
    contents[8 + 2] = 1;
    let bytes = [nar(&FILE[..5]), contents, nar(&[b")"])].concat();
    assert_eq!(
        decode(&bytes),
        Err(NarError::NonZeroPadding {
            offset: offset(&FILE[..5]) + 10
        })
    );
}

#[test]
fn rejects_bad_targets() {
    let at = offset(SYMLINK);
    for target in [&b""[..], b"a\0"] {
        let expected = NarError::InvalidTarget {
            offset: at,
            target: target.to_vec(),
        };
        assert_eq!(decode(&nar(&cat(SYMLINK, &[target]))), Err(expected));
    }
    let long = [b'a'; MAX_TARGET_LEN + 1];
    let expected = NarError::TargetTooLong {
        offset: at,
        len: long.len() as u64,
    };
    assert_eq!(decode(&nar(&cat(SYMLINK, &[&long]))), Err(expected));
    let expected = NarError::TargetTooLong {
        offset: at,
        len: u64::MAX,
    };
    assert_eq!(decode(&absurd(SYMLINK)), Err(expected));
    assert!(decode(&nar(&cat(SYMLINK, &[&long[1..], b")"]))).is_ok());
}

#[test]
fn rejects_long_names() {
    let at = offset(NAME);
    let long = [b'a'; MAX_NAME_LEN + 1];
    let expected = NarError::NameTooLong {
        offset: at,
        len: long.len() as u64,
    };
    assert_eq!(decode(&nar(&cat(NAME, &[&long]))), Err(expected));
    let expected = NarError::NameTooLong {
        offset: at,
        len: u64::MAX,
    };
    assert_eq!(decode(&absurd(NAME)), Err(expected));
}

#[test]
fn rejects_bad_names() {
    let entry = offset(NAME);
    for name in [&b""[..], b".", b"..", b"a/b", b"/", b"a\0b"] {
        let expected = NarError::InvalidName {
            offset: entry,
            name: name.to_vec(),
        };
        assert_eq!(decode(&dir_with(&[name])), Err(expected));
    }
    // ".." is invalid alone but fine as part of a name.
    assert!(decode(&dir_with(&[b"..a", b"a..", &[b'a'; MAX_NAME_LEN]])).is_ok());

    let second = offset(&[MAGIC, b"(", b"type", b"directory"])
        + offset(&[b"entry", b"(", b"name", b"b", b"node"])
        + offset(&[b"(", b"type", b"symlink", b"target", b"t", b")", b")"])
        + offset(&[b"entry", b"(", b"name"]);
    assert_eq!(
        decode(&dir_with(&[b"b", b"a"])),
        Err(NarError::UnsortedEntry {
            offset: second,
            previous: b"b".to_vec(),
            name: b"a".to_vec()
        })
    );
    assert_eq!(
        decode(&dir_with(&[b"b", b"b"])),
        Err(NarError::DuplicateEntry {
            offset: second,
            name: b"b".to_vec()
        })
    );
    // "a" < "B" only if bytes compared as signed or case-folded, neither of which Nix does.
    assert!(matches!(
        decode(&dir_with(&[b"a", b"B"])),
        Err(NarError::UnsortedEntry { .. })
    ));
}

/// `depth` directories, each the only entry of the one before.
fn nested(depth: usize) -> Vec<u8> {
    let mut strings: Vec<&[u8]> = vec![MAGIC];
    for _ in 0..depth - 1 {
        strings.extend_from_slice(&[
            b"(",
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"name",
            b"d",
            b"node",
        ]);
    }
    strings.extend_from_slice(&[b"(", b"type", b"directory", b")"]);
    for _ in 0..depth - 1 {
        strings.extend_from_slice(&[b")", b")"]);
    }
    nar(&strings)
}

#[test]
fn limits_nesting() {
    assert!(decode(&nested(MAX_DEPTH)).is_ok());
    let level = offset(&[
        b"(",
        b"type",
        b"directory",
        b"entry",
        b"(",
        b"name",
        b"d",
        b"node",
    ]);
    let expected = offset(&[MAGIC, b"(", b"type"]) + level * MAX_DEPTH as u64;
    assert_eq!(
        decode(&nested(MAX_DEPTH + 1)),
        Err(NarError::TooDeep { offset: expected })
    );
}

#[test]
fn every_proper_prefix_is_truncated() {
    let bytes = dir_with(&[b"a", b"b"]);
    for len in 0..bytes.len() {
        assert_eq!(
            decode(&bytes[..len]),
            Err(NarError::Truncated { offset: len as u64 }),
            "prefix of {len} bytes"
        );
    }
}

#[test]
fn rejects_trailing_data_at_feed_time() {
    let mut decoder = Decoder::new();
    decoder.feed(&nar(FILE), &mut ()).unwrap();
    let expected = NarError::TrailingData {
        offset: offset(FILE),
    };
    assert_eq!(decoder.feed(b"x", &mut ()), Err(expected.clone()));
    // A failed decoder stays failed, so an ignored error cannot turn into success.
    assert_eq!(decoder.feed(b"", &mut ()), Err(expected.clone()));
    assert_eq!(decoder.finish(), Err(expected));
}

#[test]
fn absurd_lengths_fail_without_waiting_for_data() {
    let mut bytes = nar(&[MAGIC, b"(", b"type", b"symlink", b"target"]);
    bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
    let mut decoder = Decoder::new();
    assert!(matches!(
        decoder.feed(&bytes, &mut ()),
        Err(NarError::TargetTooLong { .. })
    ));
}

#[test]
fn verifier_hashes_what_it_validates() {
    let bytes = dir_with(&[b"a", b"b"]);
    let mut verifier = Verifier::new();
    for piece in bytes.chunks(5) {
        verifier.update(piece).unwrap();
    }
    assert_eq!(
        verifier.finish(),
        Ok((crate::Sha256Hash::of(&bytes), bytes.len() as u64))
    );

    let mut verifier = Verifier::new();
    verifier.update(&bytes[..bytes.len() - 1]).unwrap();
    assert_eq!(
        verifier.finish(),
        Err(NarError::Truncated {
            offset: bytes.len() as u64 - 1
        })
    );
}

#[test]
fn parse_reports_nar_errors_as_invalid_data() {
    let error = parse(&nar(FILE)[..10], &mut ()).unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    assert_eq!(nar_error(&error), &NarError::Truncated { offset: 10 });
}

#[test]
fn writer_matches_the_grammar() {
    let file = Node::File {
        executable: false,
        contents: b"hi".to_vec(),
    };
    assert_eq!(write(&file), nar(FILE));
    let tree = Node::Directory(BTreeMap::from([
        (
            b"x".to_vec(),
            Node::File {
                executable: true,
                contents: vec![],
            },
        ),
        (b"y".to_vec(), Node::Symlink(b"/nix".to_vec())),
    ]));
    let expected = nar(&[
        MAGIC,
        b"(",
        b"type",
        b"directory", //
        b"entry",
        b"(",
        b"name",
        b"x",
        b"node", //
        b"(",
        b"type",
        b"regular",
        b"executable",
        b"",
        b"contents",
        b"",
        b")",
        b")", //
        b"entry",
        b"(",
        b"name",
        b"y",
        b"node", //
        b"(",
        b"type",
        b"symlink",
        b"target",
        b"/nix",
        b")",
        b")", //
        b")",
    ]);
    assert_eq!(write(&tree), expected);
}

#[test]
fn writer_enforces_the_decoder_rules_at_the_same_offsets() {
    let mut writer = NarWriter::new(Vec::new()).unwrap();
    writer.directory().unwrap();
    writer.entry(b"b").unwrap();
    writer.symlink(b"t").unwrap();
    let error = writer.entry(b"a").unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(
        Err(nar_error(&error).clone()),
        decode(&dir_with(&[b"b", b"a"]))
    );
    // The writer is poisoned: nothing can make the broken output look complete.
    assert!(writer.entry(b"c").is_err());
    assert!(writer.finish().is_err());

    let mut writer = NarWriter::new(Vec::new()).unwrap();
    writer.directory().unwrap();
    let error = writer.entry(b"a/b").unwrap_err();
    assert_eq!(Err(nar_error(&error).clone()), decode(&dir_with(&[b"a/b"])));

    let mut writer = NarWriter::new(Vec::new()).unwrap();
    let error = writer.symlink(b"").unwrap_err();
    let symlink = nar(&[MAGIC, b"(", b"type", b"symlink", b"target", b"", b")"]);
    assert_eq!(Err(nar_error(&error).clone()), decode(&symlink));

    let mut writer = NarWriter::new(Vec::new()).unwrap();
    for _ in 0..MAX_DEPTH {
        writer.directory().unwrap();
        writer.entry(b"d").unwrap();
    }
    let error = writer.directory().unwrap_err();
    let expected = decode(&nested(MAX_DEPTH + 1)).unwrap_err();
    assert_eq!(nar_error(&error), &expected);
}

#[test]
fn writer_refuses_calls_out_of_order() {
    let misuse = |result: io::Result<()>| {
        let error = result.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        error.to_string()
    };
    let mut writer = NarWriter::new(Vec::new()).unwrap();
    assert_eq!(
        misuse(writer.entry(b"a")),
        "NarWriter was given an entry where it expected a node"
    );
    writer.directory().unwrap();
    assert_eq!(
        misuse(writer.symlink(b"t")),
        "NarWriter was given a symlink where it expected an entry or the end of a directory"
    );
    writer.directory_end().unwrap();
    assert_eq!(
        misuse(writer.directory()),
        "NarWriter was given a directory where it expected nothing more"
    );

    let mut writer = NarWriter::new(Vec::new()).unwrap();
    writer.directory().unwrap();
    assert!(writer.finish().is_err());
}

#[test]
fn writer_fails_when_contents_end_early() {
    let mut writer = NarWriter::new(Vec::new()).unwrap();
    let error = writer.file(false, 10, &b"short"[..]).unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    assert!(writer.finish().is_err());
}

#[test]
fn dump_path_refuses_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("socket");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let error = dump_path(dir.path(), io::sink()).unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    assert!(
        error.to_string().contains("cannot archive a socket"),
        "{error}"
    );
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // A small alphabet, so that siblings share prefixes and collide.
        prop::collection::vec(
            prop::sample::select(vec![b'a', b'b', b'.', 0x80, 0xff]),
            1..4
        ),
        prop::collection::vec(any::<u8>(), 1..=MAX_NAME_LEN).prop_map(|mut name| {
            name.iter_mut()
                .filter(|b| **b == 0 || **b == b'/')
                .for_each(|b| *b = b'_');
            name
        }),
    ]
    .prop_filter("`.` and `..` are not names", |name| {
        name != b"." && name != b".."
    })
}

fn tree() -> impl Strategy<Value = Node> {
    let contents = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..40),
        prop::collection::vec(any::<u8>(), 0..5000),
    ];
    let target = prop::collection::vec(1..=u8::MAX, 1..100);
    let leaf = prop_oneof![
        (any::<bool>(), contents).prop_map(|(executable, contents)| Node::File {
            executable,
            contents
        }),
        target.prop_map(Node::Symlink),
    ];
    leaf.prop_recursive(5, 64, 8, |inner| {
        prop::collection::btree_map(name(), inner, 0..8).prop_map(Node::Directory)
    })
}

/// A NAR and sorted cut points within it.
fn nar_and_cuts() -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
    (
        tree(),
        prop::collection::vec(any::<prop::sample::Index>(), 0..10),
    )
        .prop_map(|(tree, cuts)| {
            let bytes = write(&tree);
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            cuts.sort_unstable();
            (bytes, cuts)
        })
}

proptest! {
    #[test]
    fn round_trips(tree in tree()) {
        let bytes = write(&tree);
        prop_assert_eq!(rebuild(&bytes), tree);
    }

    #[test]
    fn cuts_do_not_change_the_result((bytes, cuts) in nar_and_cuts()) {
        let whole = decode(&bytes);
        prop_assert!(whole.is_ok());
        prop_assert_eq!(decode_split(&bytes, &cuts), whole);
    }

    #[test]
    fn cuts_do_not_change_errors(
        (mut bytes, cuts) in nar_and_cuts(),
        at in any::<prop::sample::Index>(),
        flip in 1..=u8::MAX,
        truncate in any::<bool>(),
    ) {
        let at = at.index(bytes.len());
        if truncate {
            bytes.truncate(at);
        } else {
            bytes[at] ^= flip;
        }
        let cuts: Vec<usize> = cuts.into_iter().filter(|&cut| cut <= bytes.len()).collect();
        prop_assert_eq!(decode_split(&bytes, &cuts), decode(&bytes));
    }
}

#[test]
fn one_byte_at_a_time() {
    let tree = Node::Directory(BTreeMap::from([
        (
            b"f".to_vec(),
            Node::File {
                executable: true,
                contents: b"0123456789".to_vec(),
            },
        ),
        (b"l".to_vec(), Node::Symlink(b"f".to_vec())),
        (b"sub".to_vec(), Node::Directory(BTreeMap::new())),
    ]));
    let bytes = write(&tree);
    let cuts: Vec<usize> = (1..bytes.len()).collect();
    assert_eq!(decode_split(&bytes, &cuts), decode(&bytes));
    assert_eq!(rebuild(&bytes), tree);
}
