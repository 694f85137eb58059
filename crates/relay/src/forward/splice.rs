//! Zero-copy forwarding between two TCP sockets with `splice(2)` (Linux).
//!
//! On a plain listener the relay never needs to look at the bytes it moves, so it does not
//! copy them through its own memory: each direction splices socket → pipe → socket and the
//! kernel passes page references instead of copying (see `docs/benchmarks.md`, bulk rows).
//!
//! A pipe costs two file descriptors and a kernel buffer, so a direction holds one **only
//! while bytes are in flight**: when its reader has nothing more, the empty pipe goes back to
//! a small per-thread pool. Idle connections, which are almost all of a chat relay's
//! connections, hold no pipe. If no pipe can be had (out of file descriptors) the direction
//! falls back to copying through user space; nothing is lost.
//!
//! On other systems [`Pipe::take`] always fails, so every direction copies.

use std::io;
use std::task::{Context, Poll};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Capacity asked for each pipe, and the most bytes moved by one `splice` call.
const PIPE_SIZE: usize = 256 * 1024;

/// Empty pipes kept per thread for the next burst.
const POOL_MAX: usize = 32;

/// A kernel pipe used as the in-flight buffer of one direction.
#[derive(Debug)]
pub struct Pipe {
    #[cfg(target_os = "linux")]
    read: std::os::fd::OwnedFd,
    #[cfg(target_os = "linux")]
    write: std::os::fd::OwnedFd,
}

#[cfg(target_os = "linux")]
thread_local! {
    static POOL: std::cell::RefCell<Vec<Pipe>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// How a splice step ended.
pub enum Moved {
    /// This many bytes moved.
    Bytes(usize),
    /// The source reached end of stream.
    Eof,
}

impl Pipe {
    /// An empty pipe from this thread's pool, or a new one.
    #[cfg(target_os = "linux")]
    pub fn take() -> io::Result<Pipe> {
        if let Some(p) = POOL.with(|p| p.borrow_mut().pop()) {
            return Ok(p);
        }
        use rustix::pipe::{pipe_with, PipeFlags};
        let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        // A larger pipe moves more per call: CPU per GiB relayed 0.50 s with the default
        // 64 KiB, 0.34 s with 256 KiB, 0.31 s with 1 MiB (docs/benchmarks.md). 256 KiB keeps
        // the pooled pipes well inside the kernel's per-user pipe allowance
        // (`fs.pipe-user-pages-soft`); if the kernel refuses, the default size works too.
        let _ = rustix::pipe::fcntl_setpipe_size(&write, PIPE_SIZE);
        Ok(Pipe { read, write })
    }

    /// Splicing needs Linux.
    #[cfg(not(target_os = "linux"))]
    pub fn take() -> io::Result<Pipe> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    /// Returns an **empty** pipe to this thread's pool (closes it when the pool is full).
    pub fn give_back(self) {
        #[cfg(target_os = "linux")]
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_MAX {
                p.push(self);
            }
        });
    }

    /// Moves what `src` has (up to the pipe's capacity) into this empty pipe.
    /// `Pending` when `src` has nothing to read (its read readiness is then registered).
    pub fn fill(&self, cx: &mut Context<'_>, src: &TcpStream) -> Poll<io::Result<Moved>> {
        loop {
            std::task::ready!(src.poll_read_ready(cx))?;
            match src.try_io(Interest::READABLE, || self.splice_in(src)) {
                Ok(0) => return Poll::Ready(Ok(Moved::Eof)),
                Ok(n) => return Poll::Ready(Ok(Moved::Bytes(n))),
                // Readiness was stale and is now cleared: poll again to register.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Moves up to `len` bytes from this pipe into `dst`. `Pending` while `dst` cannot take
    /// more (its write readiness is then registered).
    pub fn drain(
        &self,
        cx: &mut Context<'_>,
        dst: &TcpStream,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(dst.poll_write_ready(cx))?;
            match dst.try_io(Interest::WRITABLE, || self.splice_out(dst, len)) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    #[cfg(target_os = "linux")]
    fn splice_in(&self, src: &TcpStream) -> io::Result<usize> {
        use rustix::pipe::{splice, SpliceFlags};
        // NONBLOCK makes the pipe side non-blocking; the socket already is. No MORE flag:
        // chat messages must not wait for a fuller segment.
        Ok(splice(
            src,
            None,
            &self.write,
            None,
            PIPE_SIZE,
            SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
        )?)
    }

    #[cfg(target_os = "linux")]
    fn splice_out(&self, dst: &TcpStream, len: usize) -> io::Result<usize> {
        use rustix::pipe::{splice, SpliceFlags};
        Ok(splice(
            &self.read,
            None,
            dst,
            None,
            len,
            SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
        )?)
    }

    #[cfg(not(target_os = "linux"))]
    fn splice_in(&self, _src: &TcpStream) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }

    #[cfg(not(target_os = "linux"))]
    fn splice_out(&self, _dst: &TcpStream, _len: usize) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// Empty pipes in this thread's pool (for tests).
#[cfg(test)]
pub fn pooled() -> usize {
    #[cfg(target_os = "linux")]
    return POOL.with(|p| p.borrow().len());
    #[cfg(not(target_os = "linux"))]
    0
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn moves_bytes_between_sockets_and_sees_eof() {
        let (mut client, relay_in) = pair().await;
        let (relay_out, mut upstream) = pair().await;
        let pipe = Pipe::take().unwrap();
        client.write_all(b"hello through the kernel").await.unwrap();
        let n = match poll_fn(|cx| pipe.fill(cx, &relay_in)).await.unwrap() {
            Moved::Bytes(n) => n,
            Moved::Eof => panic!("unexpected end"),
        };
        let mut left = n;
        while left > 0 {
            left -= poll_fn(|cx| pipe.drain(cx, &relay_out, left))
                .await
                .unwrap();
        }
        let mut got = vec![0u8; n];
        upstream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, &b"hello through the kernel"[..n]);
        client.shutdown().await.unwrap();
        let end = poll_fn(|cx| pipe.fill(cx, &relay_in)).await.unwrap();
        assert!(matches!(end, Moved::Eof));
        use std::os::fd::AsRawFd;
        let fd = pipe.read.as_raw_fd();
        pipe.give_back();
        assert_eq!(pooled(), 1);
        // The pooled pipe is the next one handed out.
        let again = Pipe::take().unwrap();
        assert_eq!(again.read.as_raw_fd(), fd);
        assert_eq!(pooled(), 0);
    }
}
