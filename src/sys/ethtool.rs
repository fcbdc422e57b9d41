//! One question to ethtool (`SIOCETHTOOL`, include/uapi/linux/ethtool.h): is a device feature
//! on? The feature's bit number differs between kernel versions, so it is found by name in
//! the device's feature strings (`ETHTOOL_GSSET_INFO`, `ETHTOOL_GSTRINGS`) before
//! `ETHTOOL_GFEATURES` reads the bits.
//!
//! Invariant: every buffer handed to the kernel is sized from the count the kernel gave, and
//! the count is bounded, so a reply never writes past what we allocated.

use super::{owned, syscall};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSSET_INFO: u32 = 0x37;
const ETHTOOL_GFEATURES: u32 = 0x3a;
const ETH_SS_FEATURES: u32 = 4;
const ETH_GSTRING_LEN: usize = 32;
/// Far above the ~70 features of 6.18.
const MAX_FEATURES: usize = 1024;

/// Runs one ethtool command on `dev` with `buf` (which starts with the command word).
fn ethtool(sock: BorrowedFd, dev: &str, buf: &mut [u32]) -> io::Result<()> {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if dev.len() >= ifr.ifr_name.len() {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(dev.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = buf.as_mut_ptr().cast();
    // SAFETY: `ifr` names the device and points at `buf`, a live buffer laid out as the
    // command in its first word expects and as large as the kernel will write (the callers
    // size it from the counts the kernel reported).
    unsafe { syscall!(ioctl(sock.as_raw_fd(), SIOCETHTOOL as _, &mut ifr))? };
    Ok(())
}

/// Whether feature `name` (as `ethtool -k` prints it, e.g. "rx-gro-list") is active on
/// `dev`; `None` when this kernel or device does not know the feature.
pub fn feature(dev: &str, name: &str) -> io::Result<Option<bool>> {
    // SAFETY: plain integer arguments.
    let fd = unsafe {
        syscall!(socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            0
        ))?
    };
    let sock = owned(fd);
    let sock = std::os::fd::AsFd::as_fd(&sock);
    // struct ethtool_sset_info { cmd; reserved; u64 sset_mask; u32 data[1] }
    let mut info = [ETHTOOL_GSSET_INFO, 0, 0, 0, 0];
    let mask = 1u64 << ETH_SS_FEATURES;
    info[2..4].copy_from_slice(&[mask as u32, (mask >> 32) as u32]);
    if cfg!(target_endian = "big") {
        info[2..4].copy_from_slice(&[(mask >> 32) as u32, mask as u32]);
    }
    ethtool(sock, dev, &mut info)?;
    let count = (info[4] as usize).min(MAX_FEATURES);
    // struct ethtool_gstrings { cmd; string_set; len; u8 data[len * 32] }
    let mut strings = vec![0u32; 3 + count * ETH_GSTRING_LEN / 4];
    strings[..3].copy_from_slice(&[ETHTOOL_GSTRINGS, ETH_SS_FEATURES, count as u32]);
    ethtool(sock, dev, &mut strings)?;
    let bytes: Vec<u8> = strings[3..].iter().flat_map(|w| w.to_ne_bytes()).collect();
    let Some(bit) = bytes.chunks(ETH_GSTRING_LEN).position(|s| {
        let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
        &s[..end] == name.as_bytes()
    }) else {
        return Ok(None);
    };
    // struct ethtool_gfeatures { cmd; size; { available, requested, active, never } [size] }
    let blocks = count.div_ceil(32);
    let mut features = vec![0u32; 2 + 4 * blocks];
    features[..2].copy_from_slice(&[ETHTOOL_GFEATURES, blocks as u32]);
    ethtool(sock, dev, &mut features)?;
    let active = features[2 + 4 * (bit / 32) + 2];
    Ok(Some(active & (1 << (bit % 32)) != 0))
}

#[cfg(test)]
mod tests {
    /// Loopback knows rx-gro-list (Linux >= 5.6) and has it off; a missing device errors.
    #[test]
    fn gro_list_on_loopback() {
        match super::feature("lo", "rx-gro-list") {
            Ok(v) => assert_ne!(v, Some(true), "rx-gro-list on lo"),
            Err(e) => panic!("ethtool on lo: {e}"),
        }
        assert_eq!(super::feature("lo", "no-such-feature").unwrap(), None);
        assert!(super::feature("ksocks-none0", "rx-gro-list").is_err());
    }
}
