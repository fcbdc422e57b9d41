//! Placeholder until the loader lands: the sockmap plane reports itself unavailable.
use std::io;
use std::os::fd::BorrowedFd;

pub struct Offload;

#[derive(Debug)]
pub struct OffloadError(pub String);

impl std::fmt::Display for OffloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Offload {
    pub fn load(_max_sockets: u32) -> Result<Offload, OffloadError> {
        Err(OffloadError("not built yet".into()))
    }
    pub fn self_test(&self) -> Result<(), OffloadError> {
        Ok(())
    }
    pub fn pair(&self, _a: BorrowedFd, _ac: u64, _b: BorrowedFd, _bc: u64) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
    pub fn hook(&self, _fd: BorrowedFd, _c: u64) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
    pub fn unhook(&self, _c: u64) -> io::Result<()> {
        Ok(())
    }
    pub fn unpair(&self, _a: u64, _b: u64) {}
    pub fn forwarded(&self, _c: u64) -> u64 {
        0
    }
    pub fn entries(&self) -> usize {
        0
    }
}
