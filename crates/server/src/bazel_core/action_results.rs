//! The action cache's rules, for both front ends: a result is stored only
//! once every blob it names is (inlined bytes moved into the CAS first), and
//! served only while every blob it names still is, so a client never gets a
//! hit whose outputs it cannot download.

use garret_meta::Cache;
use garret_nix::Sha256Hash;
use garret_proto::reapi::{ActionResult, Tree};
use prost::Message as _;

use super::digest::Digest;
use super::{Core, MAX_MESSAGE_BYTES};
use crate::access_times::Accessed;
use crate::clock::unix_now;
use crate::error::Error;
use crate::metrics::Lookup;

/// Largest serialized `ActionResult` accepted over Bazel's HTTP cache:
/// bazel-remote's limit for the same thing (results inline only digests,
/// so real ones are a few KiB). gRPC messages are bounded by
/// [`MAX_MESSAGE_BYTES`].
pub const MAX_ACTION_RESULT: usize = 4 << 20;

/// The most `Tree` bytes one completeness check reads: each output tree is
/// a message (at most [`MAX_MESSAGE_BYTES`]), and a result naming many
/// (distinct) large trees is refused instead of costing every reader.
const MAX_TREE_BYTES_PER_RESULT: u64 = 16 * MAX_MESSAGE_BYTES as u64;

/// How a result is stored.
#[derive(Debug)]
pub enum Update {
    /// REAPI's UpdateActionResult: every blob the result names must be
    /// stored already (else FAILED_PRECONDITION).
    Complete,
    /// Bazel's HTTP cache, which has no precondition answer and may upload
    /// a result beside its outputs: stored as sent (these bytes, unless
    /// inlined outputs had to move into the CAS); reads serve it only once
    /// complete.
    AsSent(bytes::Bytes),
}

/// Why a result's references are incomplete; the caller picks the code
/// (NOT_FOUND on read, FAILED_PRECONDITION on update).
struct Missing(String);

impl Core {
    /// Every blob `result` names, including the files inside its output
    /// trees, or the first tree that is missing.
    ///
    /// Trees are read as messages: each is refused unread if its digest is
    /// over [`MAX_MESSAGE_BYTES`], each distinct tree is read once, and all
    /// of them together may not exceed [`MAX_TREE_BYTES_PER_RESULT`]
    /// (RESOURCE_EXHAUSTED).
    async fn named_blobs(
        &self,
        cache: &Cache,
        result: &ActionResult,
    ) -> Result<Result<Vec<Digest>, Missing>, Error> {
        let mut digests = Vec::new();
        let mut push = |d: Option<&garret_proto::reapi::Digest>| -> Result<(), Error> {
            if let Some(d) = d {
                digests.push(Digest::from_proto(d)?);
            }
            Ok(())
        };
        for file in &result.output_files {
            push(Some(file.digest.as_ref().ok_or_else(|| {
                Error::InvalidArgument(format!("output file {:?} has no digest", file.path))
            })?))?;
        }
        push(result.stdout_digest.as_ref())?;
        push(result.stderr_digest.as_ref())?;
        let mut trees = std::collections::BTreeSet::new();
        for dir in &result.output_directories {
            let tree = Digest::from_required(dir.tree_digest.as_ref())?;
            push(dir.tree_digest.as_ref())?;
            push(dir.root_directory_digest.as_ref())?;
            trees.insert(tree);
        }
        let mut tree_bytes = 0u64;
        for tree in trees {
            tree_bytes = tree_bytes.saturating_add(tree.size);
            if tree_bytes > MAX_TREE_BYTES_PER_RESULT {
                return Err(Error::ResourceExhausted(format!(
                    "the result's output trees exceed {MAX_TREE_BYTES_PER_RESULT} bytes"
                )));
            }
            let bytes = match self.read_bounded(cache, tree, MAX_MESSAGE_BYTES).await {
                Ok(bytes) => bytes,
                Err(Error::NotFound(_) | Error::IncompleteObject(_)) => {
                    return Ok(Err(Missing(format!("output tree {tree} is missing"))));
                }
                Err(e) => return Err(e),
            };
            let tree_message = Tree::decode(bytes)
                .map_err(|e| Error::InvalidArgument(format!("{tree} is not a Tree: {e}")))?;
            for directory in tree_message.root.iter().chain(&tree_message.children) {
                for file in &directory.files {
                    digests.push(Digest::from_required(file.digest.as_ref())?);
                }
            }
        }
        Ok(Ok(digests))
    }
}

/// Whether any of the blobs a result names is missing, and which.
fn complete(missing: &[Digest]) -> Result<(), Missing> {
    match missing.first() {
        None => Ok(()),
        Some(first) => Err(Missing(format!(
            "{} referenced blob(s) are missing, e.g. {first}",
            missing.len()
        ))),
    }
}

impl Core {
    /// The result stored for `action` in `cache`, with its encoded form,
    /// if every blob it names is still stored. A missing, undecodable or
    /// incomplete result is NOT_FOUND: to the client a miss, so Bazel
    /// re-runs the action.
    ///
    /// A hit promises that the named blobs can still be downloaded (with
    /// `--remote_download_minimal`, maybe much later), so the access times
    /// of the result and of those blobs are written before it is answered
    /// (see `access_times`), and only then is completeness checked: a blob
    /// that is there after its refresh is kept by GC's access-time window,
    /// one that GC took just before is a miss.
    ///
    /// Counted as an action-cache hit or miss.
    pub(crate) async fn action_result(
        &self,
        cache: &Cache,
        action: &Sha256Hash,
    ) -> Result<(ActionResult, Vec<u8>), Error> {
        let found = self.servable_action_result(cache, action).await;
        self.metrics.lookup_result(Lookup::ActionResult, &found);
        found
    }

    /// [`Core::action_result`], uncounted.
    async fn servable_action_result(
        &self,
        cache: &Cache,
        action: &Sha256Hash,
    ) -> Result<(ActionResult, Vec<u8>), Error> {
        let stored = self
            .meta
            .get_action_result(cache.id, action.as_bytes())
            .await?
            .ok_or_else(|| Error::NotFound(format!("no result for action {}", action.to_hex())))?;
        let result = ActionResult::decode(stored.as_slice()).map_err(|e| {
            tracing::warn!(action = %action.to_hex(), error = %e, "a stored action result is corrupt");
            Error::NotFound(format!("the result of action {} is unreadable", action.to_hex()))
        })?;
        let incomplete = |Missing(why)| {
            Error::NotFound(format!(
                "the result of action {} is incomplete: {why}",
                action.to_hex()
            ))
        };
        let named = match self.named_blobs(cache, &result).await {
            Ok(named) => named.map_err(incomplete)?,
            // Stored before today's limits, or otherwise unservable.
            Err(Error::InvalidArgument(why) | Error::ResourceExhausted(why)) => {
                return Err(incomplete(Missing(why)));
            }
            Err(e) => return Err(e),
        };
        let mut accessed = Accessed::default();
        accessed.add_action_result(cache.id, *action.as_bytes());
        let hashes: Vec<[u8; 32]> = named.iter().map(|d| *d.hash_bytes()).collect();
        accessed.add_cas(cache.id, &hashes);
        if let Err(e) = self.accesses.record_durably(accessed).await {
            // Without the refresh the outputs might not outlive the answer:
            // a miss costs the client a re-run, a broken hit its build.
            tracing::warn!(action = %action.to_hex(), error = %e, "serving an action-cache hit as a miss");
            return Err(Error::NotFound(format!(
                "the result of action {} cannot be kept alive: {e}",
                action.to_hex()
            )));
        }
        let (missing, _) = self.lookup(cache, &named).await?;
        complete(&missing).map_err(incomplete)?;
        Ok((result, stored))
    }

    /// Whether every blob `result` names is stored; those that are count
    /// as used (they are about to be named by a stored result).
    async fn check_complete(
        &self,
        cache: &Cache,
        result: &ActionResult,
    ) -> Result<Result<(), Missing>, Error> {
        Ok(match self.named_blobs(cache, result).await? {
            Ok(named) => complete(&self.find_missing(cache, &named).await?),
            Err(missing) => Err(missing),
        })
    }

    /// Stores `result` for `action` in `cache`, its paths and digests
    /// checked and inlined bytes moved into the CAS. Returns the result as
    /// stored.
    pub(crate) async fn update_action_result(
        &self,
        cache: &Cache,
        action: &Sha256Hash,
        mut result: ActionResult,
        how: Update,
    ) -> Result<ActionResult, Error> {
        let sent = match &how {
            Update::Complete => None,
            Update::AsSent(sent) => Some(result.clone()).zip(Some(sent)),
        };
        self.validate(cache, &mut result).await?;
        let encoded = match sent {
            Some((decoded, bytes)) if decoded == result => bytes.clone(),
            _ => result.encode_to_vec().into(),
        };
        if matches!(how, Update::Complete)
            && let Err(Missing(why)) = self.check_complete(cache, &result).await?
        {
            return Err(Error::FailedPrecondition(format!(
                "upload the outputs before the result: {why}"
            )));
        }
        self.meta
            .put_action_result(cache.id, action.as_bytes(), &encoded, unix_now())
            .await?;
        Ok(result)
    }

    /// Checks paths and digests, and moves inlined bytes (which clients
    /// should not send, but may) into the CAS so the stored result only
    /// refers to blobs.
    async fn validate(&self, cache: &Cache, result: &mut ActionResult) -> Result<(), Error> {
        let relative = |path: &str, what: &str| {
            if path.starts_with('/') {
                Err(Error::InvalidArgument(format!(
                    "{what} path {path:?} must be relative"
                )))
            } else {
                Ok(())
            }
        };
        for file in &mut result.output_files {
            relative(&file.path, "output file")?;
            let digest = Digest::from_required(file.digest.as_ref())?;
            if !file.contents.is_empty() {
                self.store_bytes(cache, digest, std::mem::take(&mut file.contents))
                    .await?;
            }
        }
        for dir in &result.output_directories {
            relative(&dir.path, "output directory")?;
            Digest::from_required(dir.tree_digest.as_ref())?;
        }
        #[expect(
            deprecated,
            reason = "v2.0 clients still send the per-kind symlink lists"
        )]
        let all_links = result
            .output_symlinks
            .iter()
            .chain(&result.output_file_symlinks)
            .chain(&result.output_directory_symlinks);
        for link in all_links {
            relative(&link.path, "output symlink")?;
        }
        for (raw, digest) in [
            (&mut result.stdout_raw, &mut result.stdout_digest),
            (&mut result.stderr_raw, &mut result.stderr_digest),
        ] {
            if raw.is_empty() {
                continue;
            }
            let data = std::mem::take(raw);
            let expected = match digest.as_ref() {
                Some(d) => Digest::from_proto(d)?,
                None => Digest::of(&data),
            };
            self.store_bytes(cache, expected, data).await?;
            *digest = Some(expected.to_proto());
        }
        Ok(())
    }
}
