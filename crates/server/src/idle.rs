//! Streams from clients that give up on a silent client: the one idle
//! bound both front ends put on request bodies (HTTP uploads and gRPC
//! calls), each with its own error.

use std::time::Duration;

use futures::{Stream, StreamExt as _};

/// `stream`, ending with `on_idle()` as its last item when nothing arrives
/// for `idle`: multi-GB uploads may take hours, but a stalled one must not
/// hold its chunks and a connection forever.
pub fn bounded<S, T, E>(
    stream: S,
    idle: Duration,
    on_idle: impl FnOnce() -> E + Send + 'static,
) -> impl Stream<Item = Result<T, E>> + Send
where
    S: Stream<Item = Result<T, E>> + Send + 'static,
    T: Send,
    E: Send,
{
    futures::stream::unfold(Some((Box::pin(stream), on_idle)), move |state| async move {
        let (mut inner, on_idle) = state?;
        match tokio::time::timeout(idle, inner.next()).await {
            Ok(Some(item)) => Some((item, Some((inner, on_idle)))),
            Ok(None) => None,
            Err(_) => Some((Err(on_idle()), None)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_items_then_ends_a_silent_stream() {
        let items = futures::stream::iter([Ok::<_, &str>(1), Ok(2)]);
        let out: Vec<_> = bounded(items, Duration::ZERO, || "idle").collect().await;
        assert_eq!(out, [Ok(1), Ok(2)]);
        let silent = futures::stream::pending::<Result<u8, &str>>();
        let out: Vec<_> = bounded(silent, Duration::ZERO, || "idle").collect().await;
        assert_eq!(out, [Err("idle")]);
    }
}
