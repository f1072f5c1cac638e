//! A capture journal: the bytes taken out of a run's output pipe but not
//! yet known to be stored, in a memory file that outlives the daemon (it is
//! parked in the service manager's file-descriptor store with the pipe).
//!
//! Without it, a crash loses what the daemon had read from a pipe and not
//! yet stored (up to one chunk per stream). With it, bytes leave the pipe
//! only by `splice` into the journal, so at every instant each byte is in
//! the pipe, in the journal, or stored. The journal's first page is a
//! header: the journal offset up to which bytes are stored, and the stream
//! offset in the store that corresponds to it. A restarted daemon stores
//! what lies beyond again, at the same stream offsets (storing a chunk is
//! idempotent by offset), so nothing is lost and nothing doubled. Stored
//! pages are punched out, so the journal holds at most the chunk in
//! flight.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

/// Where the data begins: the header has a page to itself.
const DATA: u64 = 4096;

/// One stream's journal.
#[derive(Debug)]
pub struct Journal {
    file: fs::File,
    /// Journal offset of the next byte taken in (the file's size).
    end: u64,
    /// The header: journal offset stored through, and its stream offset.
    stored: u64,
    stream_at: u64,
}

impl Journal {
    /// A new, empty journal whose first byte goes to stream offset `at`.
    pub fn create(at: u64) -> io::Result<Journal> {
        // SAFETY: a valid C string; memfd_create touches nothing else.
        let fd = unsafe { libc::memfd_create(c"cyrnel-capture".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor that nothing else owns.
        let file = fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut j = Journal {
            file,
            end: DATA,
            stored: DATA,
            stream_at: at,
        };
        j.file.set_len(DATA)?;
        j.write_header()?;
        Ok(j)
    }

    /// A journal handed back after a restart.
    pub fn open(fd: OwnedFd) -> io::Result<Journal> {
        let file = fs::File::from(fd);
        let end = file.metadata()?.len();
        let mut header = [0u8; 16];
        file.read_exact_at(&mut header, 0)?;
        let stored = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
        let stream_at = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
        if end < DATA || stored < DATA || stored > end {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not a capture journal (size {end}, stored through {stored})"),
            ));
        }
        Ok(Journal {
            file,
            end,
            stored,
            stream_at,
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.file.as_fd()
    }

    pub fn into_fd(self) -> OwnedFd {
        OwnedFd::from(self.file)
    }

    /// What was taken in and not stored: its stream offset and bytes.
    pub fn pending(&self) -> io::Result<(u64, Vec<u8>)> {
        let mut buf = vec![0u8; (self.end - self.stored) as usize];
        self.file.read_exact_at(&mut buf, self.stored)?;
        Ok((self.stream_at, buf))
    }

    /// Moves up to `max` bytes out of the (non-blocking) pipe into the
    /// journal; returns how many (0: end of file). WouldBlock when empty.
    pub fn take_from(&mut self, pipe: BorrowedFd<'_>, max: usize) -> io::Result<usize> {
        let mut off = self.end as libc::loff_t;
        // SAFETY: splice between two open descriptors; `off` is a valid,
        // writable local the kernel advances.
        let n = unsafe {
            libc::splice(
                pipe.as_raw_fd(),
                std::ptr::null_mut(),
                self.file.as_raw_fd(),
                &mut off,
                max,
                libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.end = off as u64;
        Ok(n as usize)
    }

    /// The bytes taken in by the last `take_from` calls since `stored`.
    pub fn unstored(&self) -> io::Result<Vec<u8>> {
        self.pending().map(|(_, b)| b)
    }

    /// Everything taken in so far is stored (or dropped past the cap);
    /// `kept` of it went to the stream. Frees the stored pages.
    pub fn mark_stored(&mut self, kept: u64) -> io::Result<()> {
        self.stored = self.end;
        self.stream_at += kept;
        self.write_header()?;
        let start = DATA;
        let through = self.stored & !(DATA - 1);
        if through > start {
            // SAFETY: fallocate on an open descriptor; no memory of ours.
            let r = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    start as libc::off_t,
                    (through - start) as libc::off_t,
                )
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    fn write_header(&mut self) -> io::Result<()> {
        let mut header = [0u8; 16];
        header[..8].copy_from_slice(&self.stored.to_le_bytes());
        header[8..].copy_from_slice(&self.stream_at.to_le_bytes());
        // One 16-byte write within the first page: a crash sees the old
        // header or the new one.
        self.file.write_all_at(&header, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn pipe() -> (fs::File, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array.
        let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
        assert_eq!(r, 0);
        // SAFETY: both are new descriptors owned here.
        unsafe { (fs::File::from_raw_fd(fds[1]), OwnedFd::from_raw_fd(fds[0])) }
    }

    #[test]
    fn what_is_taken_in_is_pending_until_marked_and_survives_a_reopen() {
        use std::os::fd::AsFd;
        let (mut w, r) = pipe();
        let mut j = Journal::create(100).unwrap();
        w.write_all(b"hello ").unwrap();
        assert_eq!(j.take_from(r.as_fd(), 64).unwrap(), 6);
        assert_eq!(j.unstored().unwrap(), b"hello ");
        j.mark_stored(6).unwrap();
        w.write_all(b"world").unwrap();
        assert_eq!(j.take_from(r.as_fd(), 64).unwrap(), 5);
        // "Crash": the journal is all that is left of the daemon's side.
        let again = Journal::open(j.into_fd()).unwrap();
        assert_eq!(again.pending().unwrap(), (106, b"world".to_vec()));
        // The pipe is empty: every byte is in the journal or stored.
        let mut again = again;
        let e = again.take_from(r.as_fd(), 64).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn stored_pages_are_freed() {
        use std::os::fd::AsFd;
        let (mut w, r) = pipe();
        let mut j = Journal::create(0).unwrap();
        let chunk = vec![b'x'; 60_000];
        w.write_all(&chunk).unwrap();
        let mut got = 0;
        while got < chunk.len() {
            got += j.take_from(r.as_fd(), 1 << 16).unwrap();
        }
        j.mark_stored(got as u64).unwrap();
        let blocks = {
            use std::os::unix::fs::MetadataExt;
            j.file.metadata().unwrap().blocks()
        };
        // At most the header page and one partly stored page remain.
        assert!(blocks <= 16, "{blocks} blocks of 512 bytes");
        assert_eq!(j.pending().unwrap(), (60_000, Vec::new()));
    }
}
