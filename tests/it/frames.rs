//! The unit of forwarding is the upstream read, not the event: what the body hands hyper, frame
//! by frame, for bursts, paced streams and removed events, counted at the body seam.

use bytes::Bytes;
use http_body::{Body as _, Frame};
use lmgate::body::{Body, Mode};
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// An upstream body: each poll hands out the next read, or, at a `None`, returns `Pending` once
/// (woken at once, as a socket that becomes readable again).
struct Script(VecDeque<Option<Bytes>>);

impl http_body::Body for Script {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.0.pop_front() {
            Some(Some(read)) => Poll::Ready(Some(Ok(Frame::data(read)))),
            Some(None) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            None => Poll::Ready(None),
        }
    }
}

/// The frames the client's side gets, in order, and how many times the body said `Pending` (held
/// everything back).
fn frames(reads: Vec<Option<Bytes>>, strip_usage: bool) -> (Vec<Bytes>, usize) {
    frames_in(reads, Mode::sse(strip_usage))
}

fn frames_in(reads: Vec<Option<Bytes>>, mode: Mode) -> (Vec<Bytes>, usize) {
    // The body arms its idle timer when the upstream has nothing: a runtime must be entered.
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let _runtime = rt.enter();
    let upstream = Script(reads.into());
    let mut body = Body::passthrough_from(upstream, mode, Duration::from_secs(60), "test");
    let mut cx = Context::from_waker(Waker::noop());
    let (mut out, mut pending) = (Vec::new(), 0);
    loop {
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(f))) => out.push(f.into_data().expect("a data frame")),
            Poll::Ready(Some(Err(e))) => panic!("the body failed: {e}"),
            Poll::Ready(None) => return (out, pending),
            Poll::Pending => pending += 1,
        }
    }
}

fn chunk(i: usize) -> String {
    format!(
        "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\
         \"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token {i}\"}},\"finish_reason\":null}}],\"usage\":null}}\n\n"
    )
}

const USAGE: &str = "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\
                     \"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5,\"total_tokens\":8}}\n\n";

fn joined(frames: &[Bytes]) -> String {
    String::from_utf8(frames.concat()).unwrap()
}

#[test]
fn a_burst_in_one_read_goes_out_as_that_read_one_frame_and_no_copy() {
    let stream: String = (0..100).map(chunk).collect::<String>() + "data: [DONE]\n\n";
    let read = Bytes::from(stream.clone());
    let (out, _) = frames(vec![Some(read.clone())], true);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].as_ptr(), read.as_ptr(), "the frame is a slice of the upstream's buffer");
    assert_eq!(joined(&out), stream);
}

#[test]
fn ready_reads_are_gathered_into_far_fewer_frames() {
    let n = 1000;
    let reads: Vec<Option<Bytes>> = (0..n).map(|i| Some(Bytes::from(chunk(i)))).collect();
    let want: String = (0..n).map(chunk).collect();
    let (out, _) = frames(reads, true);
    assert_eq!(joined(&out), want);
    assert!(out.len() * 50 <= n, "{} frames for {n} reads that were all ready", out.len());
}

#[test]
fn a_paced_stream_goes_out_read_by_read_without_waiting_for_more() {
    let n = 50;
    let mut reads = Vec::new();
    for i in 0..n {
        reads.push(Some(Bytes::from(chunk(i))));
        reads.push(None);
    }
    let (out, pending) = frames(reads, true);
    assert_eq!(out.len(), n, "one frame per read");
    assert!(out.iter().enumerate().all(|(i, f)| f[..] == *chunk(i).as_bytes()));
    assert_eq!(pending, 0, "each read went out when the upstream paused, none waited for the next");
}

#[test]
fn bytes_are_exact_at_every_chunking_with_a_removed_event_inside_a_gathered_read() {
    for line_end in ["\n", "\r\n"] {
        let head: String = (0..3).map(chunk).collect();
        let tail = chunk(3) + "data: [DONE]\n\n";
        let stream = (head.clone() + USAGE + &tail).replace('\n', line_end);
        let want = (head + &tail).replace('\n', line_end);
        let bytes = Bytes::from(stream.clone());
        for step in 1..=bytes.len() {
            // Every read ready at once (gathered), and every read alone (paced).
            for gap in [false, true] {
                let mut reads = Vec::new();
                for at in (0..bytes.len()).step_by(step) {
                    reads.push(Some(bytes.slice(at..(at + step).min(bytes.len()))));
                    if gap {
                        reads.push(None);
                    }
                }
                let (out, _) = frames(reads, true);
                assert_eq!(joined(&out), want, "step {step}, gaps {gap}, {line_end:?}");
            }
        }
        // Nothing removed when the client asked for usage itself: every byte, as sent.
        let (out, _) = frames(vec![Some(bytes.clone())], false);
        assert_eq!(joined(&out), stream);
    }
}

#[test]
fn a_large_read_is_never_copied_to_join_a_small_one() {
    let small = Bytes::from(chunk(0));
    let large = Bytes::from(vec![b'x'; 1 << 20]);
    let (out, _) = frames_in(vec![Some(small.clone()), Some(large.clone())], Mode::json());
    assert_eq!(out.len(), 2);
    assert_eq!((out[0].as_ptr(), out[1].as_ptr()), (small.as_ptr(), large.as_ptr()));
}

/// An upstream that sends one read, then trailers.
struct WithTrailers(Option<Bytes>, bool);

impl http_body::Body for WithTrailers {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(read) = self.0.take() {
            return Poll::Ready(Some(Ok(Frame::data(read))));
        }
        if std::mem::replace(&mut self.1, false) {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("x-upstream-secret", http::HeaderValue::from_static("s3cret"));
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        Poll::Ready(None)
    }
}

#[test]
fn upstream_trailers_are_dropped_not_forwarded() {
    for mode in [Mode::json(), Mode::sse(true)] {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let _runtime = rt.enter();
        let upstream = WithTrailers(Some(Bytes::from(chunk(0))), true);
        let mut body = Body::passthrough_from(upstream, mode, Duration::from_secs(60), "test");
        let mut cx = Context::from_waker(Waker::noop());
        let mut data = Vec::new();
        loop {
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(f))) => match f.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    Err(f) => panic!("a trailers frame reached the client: {:?}", f.trailers_ref()),
                },
                Poll::Ready(Some(Err(e))) => panic!("{e}"),
                Poll::Ready(None) => break,
                Poll::Pending => {}
            }
        }
        assert_eq!(data, chunk(0).as_bytes());
    }
}
