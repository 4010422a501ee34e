//! A streaming NAR encoder, and `nix-store --dump` on top of it.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use super::NarError;
use super::wire::framed::{
    CLOSE, CONTENTS, DIRECTORY, EMPTY, ENTRY, EXECUTABLE, MAGIC, NAME, NODE, OPEN, REGULAR,
    SYMLINK, TARGET, TYPE,
};
use super::wire::{self, DirStack};

/// The owner-execute bit: Nix marks a file executable on it alone (`S_IXUSR`).
const S_IXUSR: u32 = 0o100;

/// What the writer may be given next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A node: the root, or the node of the entry just started.
    Node,
    /// An entry, or the end of the innermost directory.
    Entries,
    /// Nothing: the root node is complete.
    Done,
    /// Nothing: a call failed halfway and the output is broken.
    Failed,
}

/// Writes a NAR as a series of calls that mirror [`Visitor`](super::Visitor):
/// `file`, `symlink`, or `directory`, then per entry `entry(name)` and one
/// node, then `directory_end`.
///
/// It enforces the same rules as the decoder (entry order, names, targets,
/// depth), so whatever it writes decodes. Calls out of order and rule breaks are
/// [`io::ErrorKind::InvalidInput`] errors, the latter wrapping a [`NarError`].
/// A call out of order writes nothing and can be followed by a correct one; any
/// other error makes the writer refuse all further calls, so that a half-written
/// node can never be passed off as a complete archive by [`finish`](Self::finish).
///
/// Tokens are written in small pieces: give it a buffered sink.
#[derive(Debug)]
pub struct NarWriter<W: Write> {
    out: W,
    offset: u64,
    dirs: DirStack,
    state: State,
}

impl<W: Write> NarWriter<W> {
    /// Starts an archive by writing the magic.
    pub fn new(out: W) -> io::Result<Self> {
        let mut writer = Self {
            out,
            offset: 0,
            dirs: DirStack::default(),
            state: State::Node,
        };
        writer.raw(MAGIC)?;
        Ok(writer)
    }

    /// The archive's size so far.
    pub fn bytes_written(&self) -> u64 {
        self.offset
    }

    /// Writes a regular file of exactly `size` bytes read from `contents`,
    /// failing if it ends early, like Nix does when a file shrinks mid-dump.
    pub fn file(&mut self, executable: bool, size: u64, contents: impl io::Read) -> io::Result<()> {
        self.guarded(State::Node, "a file", |w| {
            w.raw_all(&[OPEN, TYPE, REGULAR])?;
            if executable {
                w.raw_all(&[EXECUTABLE, EMPTY])?;
            }
            w.raw(CONTENTS)?;
            w.raw(&size.to_le_bytes())?;
            let copied = io::copy(&mut contents.take(size), &mut w.out)?;
            w.offset += copied;
            if copied != size {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("file contents ended after {copied} of {size} bytes"),
                ));
            }
            w.raw(&[0; 8][..wire::padding_len(size)])?;
            w.raw(CLOSE)?;
            w.node_closed()
        })
    }

    pub fn symlink(&mut self, target: &[u8]) -> io::Result<()> {
        self.guarded(State::Node, "a symlink", |w| {
            let target_offset = w.offset + len(&[OPEN, TYPE, SYMLINK, TARGET]);
            wire::check_target(target_offset, target).map_err(invalid)?;
            w.raw_all(&[OPEN, TYPE, SYMLINK, TARGET])?;
            w.string(target)?;
            w.raw(CLOSE)?;
            w.node_closed()
        })
    }

    /// Opens a directory; its entries follow, then [`directory_end`](Self::directory_end).
    pub fn directory(&mut self) -> io::Result<()> {
        self.guarded(State::Node, "a directory", |w| {
            w.dirs
                .open(w.offset + len(&[OPEN, TYPE]))
                .map_err(invalid)?;
            w.raw_all(&[OPEN, TYPE, DIRECTORY])?;
            w.state = State::Entries;
            Ok(())
        })
    }

    /// Starts an entry of the innermost directory; exactly one node must follow.
    /// Names must come in strictly increasing bytewise order.
    pub fn entry(&mut self, name: &[u8]) -> io::Result<()> {
        self.guarded(State::Entries, "an entry", |w| {
            w.dirs
                .entry(w.offset + len(&[ENTRY, OPEN, NAME]), name)
                .map_err(invalid)?;
            w.raw_all(&[ENTRY, OPEN, NAME])?;
            w.string(name)?;
            w.raw(NODE)?;
            w.state = State::Node;
            Ok(())
        })
    }

    pub fn directory_end(&mut self) -> io::Result<()> {
        self.guarded(State::Entries, "the end of a directory", |w| {
            w.raw(CLOSE)?;
            w.dirs.close();
            w.node_closed()
        })
    }

    /// Flushes and returns the sink, once the root node is complete.
    pub fn finish(mut self) -> io::Result<W> {
        if self.state != State::Done {
            return Err(misuse("finish", self.state));
        }
        self.out.flush()?;
        Ok(self.out)
    }

    /// Runs `f` if the writer is in state `state`, and poisons it if `f` fails.
    fn guarded(
        &mut self,
        state: State,
        what: &str,
        f: impl FnOnce(&mut Self) -> io::Result<()>,
    ) -> io::Result<()> {
        if self.state != state {
            return Err(misuse(what, self.state));
        }
        let result = f(self);
        if result.is_err() {
            self.state = State::Failed;
        }
        result
    }

    fn node_closed(&mut self) -> io::Result<()> {
        if self.dirs.depth() == 0 {
            self.state = State::Done;
        } else {
            self.raw(CLOSE)?;
            self.state = State::Entries;
        }
        Ok(())
    }

    fn raw_all(&mut self, pieces: &[&[u8]]) -> io::Result<()> {
        pieces.iter().try_for_each(|piece| self.raw(piece))
    }

    fn string(&mut self, s: &[u8]) -> io::Result<()> {
        self.raw(&(s.len() as u64).to_le_bytes())?;
        self.raw(s)?;
        self.raw(&[0; 8][..wire::padding_len(s.len() as u64)])
    }

    fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }
}

fn len(pieces: &[&[u8]]) -> u64 {
    pieces.iter().map(|piece| piece.len() as u64).sum()
}

fn invalid(error: NarError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, error)
}

fn misuse(what: &str, state: State) -> io::Error {
    let expected = match state {
        State::Node => "a node",
        State::Entries => "an entry or the end of a directory",
        State::Done => "nothing more",
        State::Failed => "nothing more, after an earlier error",
    };
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("NarWriter was given {what} where it expected {expected}"),
    )
}

/// Serialises the file system tree at `path` exactly like `nix-store --dump`,
/// streaming file contents, and returns the NAR's size.
///
/// Symlinks are archived, not followed, including at `path` itself. Sockets,
/// FIFOs and devices cannot be archived and are an error, as in Nix.
pub fn dump_path(path: &Path, out: impl Write) -> io::Result<u64> {
    let mut writer = NarWriter::new(BufWriter::with_capacity(64 * 1024, out))?;
    dump_node(&mut writer, path)?;
    let size = writer.bytes_written();
    writer.finish()?;
    Ok(size)
}

fn dump_node<W: Write>(writer: &mut NarWriter<W>, path: &Path) -> io::Result<()> {
    let at =
        |error: io::Error| io::Error::new(error.kind(), format!("{}: {error}", path.display()));
    let metadata = fs::symlink_metadata(path).map_err(at)?;
    let file_type = metadata.file_type();
    if file_type.is_file() {
        let file = File::open(path).map_err(at)?;
        writer.file(metadata.mode() & S_IXUSR != 0, metadata.len(), file)
    } else if file_type.is_symlink() {
        writer.symlink(fs::read_link(path).map_err(at)?.as_os_str().as_bytes())
    } else if file_type.is_dir() {
        let mut names = fs::read_dir(path)
            .and_then(|entries| {
                entries
                    .map(|e| e.map(|e| e.file_name()))
                    .collect::<io::Result<Vec<OsString>>>()
            })
            .map_err(at)?;
        names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        writer.directory()?;
        for name in names {
            writer.entry(name.as_bytes())?;
            dump_node(writer, &path.join(name))?;
        }
        writer.directory_end()
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: cannot archive a socket, FIFO or device",
                path.display()
            ),
        ))
    }
}
