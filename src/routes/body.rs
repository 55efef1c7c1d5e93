//! Reading a request body whole: at most `max_body_bytes` (413), within `body_read_timeout`
//! (408), and inside a budget shared by every body being received at once
//! (`max_buffered_body_bytes`; 503 with Retry-After), so slow or unfinished bodies can hold
//! neither memory nor a connection without bound. Handlers call it after authentication (a route
//! layer), so a client without credentials never gets a byte buffered.

use std::sync::Arc;

use axum::body::{Body, Bytes, HttpBody};
use axum::http::StatusCode;
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::ApiError;
use crate::config::Limits;

/// The budget's unit: permits are kibibytes, so a 64 MiB budget is 65,536 permits.
const UNIT: usize = 1024;

/// Seconds a client is asked to wait when the budget is spent.
const RETRY_AFTER_SECS: u32 = 5;

/// Bytes of bodies being received, all requests together.
#[derive(Clone, Debug)]
pub struct BodyBudget(Arc<Semaphore>);

impl BodyBudget {
    pub fn new(bytes: usize) -> BodyBudget {
        BodyBudget(Arc::new(Semaphore::new(bytes / UNIT)))
    }
}

/// A body read whole, holding its share of the budget until dropped.
pub struct BufferedBody {
    bytes: Bytes,
    _share: Option<OwnedSemaphorePermit>,
}

impl std::ops::Deref for BufferedBody {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Reads `body` whole under `limits` and `budget`. A declared `Content-Length` is refused or
/// reserved before the first byte is read; a chunked body takes its share as it grows.
pub async fn read_body(
    body: Body,
    limits: &Limits,
    budget: &BodyBudget,
) -> Result<BufferedBody, ApiError> {
    let deadline = tokio::time::Instant::now() + limits.body_read_timeout;
    let max = limits.max_body_bytes;
    let mut share = Share {
        budget,
        permit: None,
        bytes: 0,
    };
    // Most bodies arrive in one frame: it is kept as it came, without a copy. A second frame
    // starts a buffer that takes both.
    let mut first: Option<Bytes> = None;
    let mut buf = Vec::new();
    let declared = body.size_hint().exact();
    let declared = declared.map(|d| usize::try_from(d).unwrap_or(usize::MAX));
    if let Some(declared) = declared {
        if declared > max {
            return Err(too_large(max));
        }
        if let Err(refused) = share.grow_to(declared) {
            discard(body, deadline, max).await;
            return Err(refused);
        }
    }
    // One deadline for the whole body, not one timer per frame.
    let read = async {
        let mut body = body;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the request body: {e}"),
                )
            })?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            let held = buf.len() + first.as_ref().map_or(0, Bytes::len);
            let len = held + data.len();
            if len > max {
                return Err(too_large(max));
            }
            if held == 0 {
                if let Err(refused) = share.grow_to(len) {
                    discard(body, deadline, max - len).await;
                    return Err(refused);
                }
                first = Some(data);
                continue;
            }
            if let Some(f) = first.take() {
                buf.reserve_exact(declared.unwrap_or(0).max(f.len()));
                buf.extend_from_slice(&f);
            }
            if len > buf.capacity() {
                // Grow as Vec would, but with the budget paying for the capacity first.
                let capacity = len.max(buf.capacity() * 2).min(max);
                if let Err(refused) = share.grow_to(capacity) {
                    discard(body, deadline, max - len).await;
                    return Err(refused);
                }
                buf.reserve_exact(capacity - buf.len());
            }
            buf.extend_from_slice(&data);
        }
        Ok(())
    };
    // A webhook's body has usually arrived with its headers: read it without arming a timer, which
    // costs more than the read; only a body still on its way gets the deadline.
    let read = {
        let mut read = std::pin::pin!(read);
        match futures_util::FutureExt::now_or_never(read.as_mut()) {
            Some(read) => Ok(read),
            None => tokio::time::timeout_at(deadline, read).await,
        }
    };
    match read {
        Ok(read) => read?,
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "request body not received within limits.body_read_timeout ({:?})",
                    limits.body_read_timeout
                ),
            ))
        }
    }
    let bytes = match first {
        Some(only) => only,
        None => Bytes::from(buf),
    };
    Ok(BufferedBody {
        bytes,
        _share: share.permit,
    })
}

/// Reads and drops up to `max` more bytes of a refused body before its deadline, so that a
/// client still sending it reads the refusal rather than a reset connection.
async fn discard(mut body: Body, deadline: tokio::time::Instant, max: usize) {
    let mut left = max;
    let _ = tokio::time::timeout_at(deadline, async {
        while let Some(Ok(frame)) = body.frame().await {
            let n = frame.data_ref().map_or(0, |d| d.len());
            match left.checked_sub(n) {
                Some(l) => left = l,
                None => return,
            }
        }
    })
    .await;
}

fn too_large(max: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body larger than limits.max_body_bytes ({max} bytes)"),
    )
}

/// One body's part of the budget.
struct Share<'a> {
    budget: &'a BodyBudget,
    permit: Option<OwnedSemaphorePermit>,
    bytes: usize,
}

impl Share<'_> {
    /// Takes enough of the budget to hold `bytes`, or refuses the body with 503.
    fn grow_to(&mut self, bytes: usize) -> Result<(), ApiError> {
        let held = self.bytes.div_ceil(UNIT);
        let needed = bytes.div_ceil(UNIT).saturating_sub(held);
        if needed == 0 {
            return Ok(());
        }
        let more = u32::try_from(needed)
            .ok()
            .and_then(|n| Arc::clone(&self.budget.0).try_acquire_many_owned(n).ok())
            .ok_or_else(spent)?;
        match &mut self.permit {
            Some(permit) => permit.merge(more),
            None => self.permit = Some(more),
        }
        self.bytes = bytes;
        Ok(())
    }
}

fn spent() -> ApiError {
    let mut e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too many request bodies being received at once (limits.max_buffered_body_bytes); retry later",
    );
    e.retry_after = Some(RETRY_AFTER_SECS);
    e
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits() -> Limits {
        Limits {
            max_body_bytes: 64 * 1024,
            body_read_timeout: Duration::from_millis(200),
            ..Limits::default()
        }
    }

    #[tokio::test]
    async fn a_body_holds_its_share_of_the_budget_until_dropped() {
        let budget = BodyBudget::new(10 * 1024);
        let body = read_body(Body::from(vec![b'x'; 6 * 1024]), &limits(), &budget)
            .await
            .unwrap();
        assert_eq!(body.len(), 6 * 1024);
        let refused = read_body(Body::from(vec![b'x'; 6 * 1024]), &limits(), &budget)
            .await
            .err()
            .unwrap();
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(refused.retry_after, Some(RETRY_AFTER_SECS));
        drop(body);
        read_body(Body::from(vec![b'x'; 6 * 1024]), &limits(), &budget)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_body_of_one_frame_is_kept_as_it_came_and_one_of_several_is_joined() {
        static PAYLOAD: &[u8] = b"{\"version\":\"4\",\"alerts\":[]}";
        let budget = BodyBudget::new(1024 * 1024);
        let body = read_body(Body::from(Bytes::from_static(PAYLOAD)), &limits(), &budget)
            .await
            .unwrap();
        assert_eq!(&*body, PAYLOAD);
        assert_eq!(body.as_ptr(), PAYLOAD.as_ptr(), "not copied");
        let frames = futures_util::stream::iter(
            PAYLOAD
                .chunks(7)
                .map(|c| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c))),
        );
        let body = read_body(Body::from_stream(frames), &limits(), &budget)
            .await
            .unwrap();
        assert_eq!(&*body, PAYLOAD);
    }

    #[tokio::test]
    async fn a_streamed_body_pays_for_its_growth_and_stops_at_the_limit() {
        let chunks = |n: usize| {
            let stream = futures_util::stream::iter(
                (0..n).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; 1024]))),
            );
            Body::from_stream(stream)
        };
        let budget = BodyBudget::new(1024 * 1024);
        let body = read_body(chunks(40), &limits(), &budget).await.unwrap();
        assert_eq!(body.len(), 40 * 1024);
        let too_large = read_body(chunks(65), &limits(), &budget)
            .await
            .err()
            .unwrap();
        assert_eq!(too_large.status, StatusCode::PAYLOAD_TOO_LARGE);
        let small = BodyBudget::new(16 * 1024);
        let spent = read_body(chunks(40), &limits(), &small)
            .await
            .err()
            .unwrap();
        assert_eq!(spent.status, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn a_body_that_stops_arriving_is_408_naming_the_limit() {
        let (_tx, stream) = {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
            (tx, tokio_stream_from(rx))
        };
        let err = read_body(
            Body::from_stream(stream),
            &limits(),
            &BodyBudget::new(1 << 20),
        )
        .await
        .err()
        .unwrap();
        assert_eq!(err.status, StatusCode::REQUEST_TIMEOUT);
        assert!(err.message.contains("body_read_timeout"), "{}", err.message);
    }

    fn tokio_stream_from<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> + Send + 'static {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
