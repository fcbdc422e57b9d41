//! The ELF half of the BPF loader, pure: reads a relocatable ELF64 BPF object (clang
//! `-target bpfel`/`bpfeb`) in either byte order — section headers, the symbol table, the
//! `license` section — and relocates a program section's map references.
//!
//! Invariant: every offset read from the file is bounds-checked before use; a malformed object
//! is an `Err`, never a panic. Relocation only rewrites `R_BPF_64_64` map loads (`ld_imm64`)
//! into `BPF_PSEUDO_MAP_FD` loads, keeping the object's byte order.

use crate::sys::bpf;
use std::ffi::CString;

// --- ELF64 (elf(5); values from include/uapi/linux/elf.h and elf-em.h) ---
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ELFDATA2MSB: u8 = 2;
const EM_BPF: u16 = 247;
const SHT_RELA: u32 = 4;
const SHT_NOBITS: u32 = 8;
const SHT_REL: u32 = 9;
const R_BPF_64_64: u32 = 1;
/// `BPF_LD | BPF_IMM | BPF_DW`: the two-slot 64-bit immediate load.
pub const BPF_LD_IMM64: u8 = 0x18;

pub struct Elf<'a> {
    data: &'a [u8],
    pub big: bool,
    sections: Vec<Section>,
    shstrndx: usize,
}

#[derive(Clone, Copy)]
pub struct Section {
    name: u32,
    kind: u32,
    pub offset: usize,
    pub size: usize,
    link: usize,
    info: usize,
}

impl<'a> Elf<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Elf<'a>, String> {
        if data.len() < 64 || data[..4] != *b"\x7fELF" || data[4] != ELFCLASS64 {
            return Err("not an ELF64 file".into());
        }
        let big = match data[5] {
            ELFDATA2LSB => false,
            ELFDATA2MSB => true,
            _ => return Err("unknown byte order".into()),
        };
        let mut elf = Elf {
            data,
            big,
            sections: Vec::new(),
            shstrndx: 0,
        };
        if elf.u16(18)? != EM_BPF {
            return Err("not a BPF object".into());
        }
        let (shoff, shentsize, shnum) = (elf.usize(0x28)?, elf.u16(0x3a)?, elf.u16(0x3c)?);
        if shentsize != 64 {
            return Err("unexpected section header size".into());
        }
        for i in 0..usize::from(shnum) {
            let h = shoff
                .checked_add(i * 64)
                .ok_or("bad section header offset")?;
            elf.bytes(h, 64)?;
            let s = Section {
                name: elf.u32(h)?,
                kind: elf.u32(h + 4)?,
                offset: elf.usize(h + 24)?,
                size: elf.usize(h + 32)?,
                link: elf.u32(h + 40)? as usize,
                info: elf.u32(h + 44)? as usize,
            };
            if s.kind != SHT_NOBITS {
                elf.bytes(s.offset, s.size)?;
            }
            elf.sections.push(s);
        }
        elf.shstrndx = usize::from(elf.u16(0x3e)?);
        elf.section_at(elf.shstrndx)?;
        Ok(elf)
    }

    pub fn bytes(&self, offset: usize, len: usize) -> Result<&'a [u8], String> {
        let end = offset.checked_add(len).ok_or("offset overflow")?;
        self.data
            .get(offset..end)
            .ok_or_else(|| "truncated".to_string())
    }

    fn array<const N: usize>(&self, offset: usize) -> Result<[u8; N], String> {
        let mut out = [0; N];
        out.copy_from_slice(self.bytes(offset, N)?);
        if self.big == cfg!(target_endian = "little") {
            out.reverse(); // now in host order
        }
        Ok(out)
    }

    pub fn u16(&self, offset: usize) -> Result<u16, String> {
        self.array(offset).map(u16::from_ne_bytes)
    }

    pub fn u32(&self, offset: usize) -> Result<u32, String> {
        self.array(offset).map(u32::from_ne_bytes)
    }

    pub fn u64(&self, offset: usize) -> Result<u64, String> {
        self.array(offset).map(u64::from_ne_bytes)
    }

    fn usize(&self, offset: usize) -> Result<usize, String> {
        usize::try_from(self.u64(offset)?).map_err(|_| "offset too large".to_string())
    }

    /// The NUL-terminated string at `offset` in string table `strtab`.
    fn str(&self, strtab: usize, offset: u32) -> Result<&'a str, String> {
        let s = self.section_at(strtab)?;
        let rest = self
            .bytes(s.offset, s.size)?
            .get(offset as usize..)
            .ok_or("bad string offset")?;
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or("unterminated string")?;
        std::str::from_utf8(&rest[..end]).map_err(|_| "string not UTF-8".to_string())
    }

    pub fn section_at(&self, index: usize) -> Result<Section, String> {
        self.sections
            .get(index)
            .copied()
            .ok_or_else(|| format!("no section {index}"))
    }

    /// Index and header of the section called `name`.
    pub fn section(&self, name: &str) -> Result<(usize, Section), String> {
        for (i, s) in self.sections.iter().enumerate() {
            if self.str(self.shstrndx, s.name)? == name {
                return Ok((i, *s));
            }
        }
        Err(format!("no section `{name}`"))
    }

    /// Name and value of symbol `index` of symbol table `symtab`.
    pub fn symbol(&self, symtab: usize, index: usize) -> Result<(&'a str, u64), String> {
        let s = self.section_at(symtab)?;
        let at = index
            .checked_mul(24)
            .filter(|&o| o + 24 <= s.size)
            .ok_or(format!("no symbol {index}"))?;
        let at = s.offset + at;
        Ok((self.str(s.link, self.u32(at)?)?, self.u64(at + 8)?))
    }

    pub fn license(&self) -> Result<CString, String> {
        let (_, s) = self.section("license")?;
        let text = self.bytes(s.offset, s.size)?;
        let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
        CString::new(&text[..end]).map_err(|_| "bad license".to_string())
    }
}

/// Copies program section `section` and points each map reference (an `R_BPF_64_64`
/// relocation on a `ld_imm64`) at `map_fd(symbol name)`. Instructions keep the object's
/// byte order.
pub fn relocate(
    elf: &Elf,
    section: &str,
    map_fd: &dyn Fn(&str) -> Option<i32>,
) -> Result<Vec<u8>, String> {
    let (index, prog) = elf.section(section)?;
    let mut insns = elf.bytes(prog.offset, prog.size)?.to_vec();
    if insns.len() % 8 != 0 {
        return Err(format!("`{section}` is not a whole number of instructions"));
    }
    for rel in elf.sections.iter().filter(|s| s.info == index) {
        match rel.kind {
            SHT_REL => {}
            SHT_RELA => return Err(format!("RELA relocations in `{section}`")),
            _ => continue,
        }
        for i in 0..rel.size / 16 {
            let at = rel.offset + i * 16;
            let (offset, info) = (elf.usize(at)?, elf.u64(at + 8)?);
            let (name, _) = elf.symbol(rel.link, (info >> 32) as usize)?;
            if info as u32 != R_BPF_64_64 {
                return Err(format!("relocation type {} against `{name}`", info as u32));
            }
            let fd = map_fd(name).ok_or_else(|| format!("`{name}` is not a known map"))?;
            let insn = offset
                .checked_add(16)
                .and_then(|end| insns.get_mut(offset..end))
                .filter(|insn| insn[0] == BPF_LD_IMM64)
                .ok_or_else(|| format!("reference to `{name}` is not a ld_imm64"))?;
            let (dst, _) = regs(insn[1], elf.big);
            insn[1] = with_regs(dst, bpf::BPF_PSEUDO_MAP_FD, elf.big);
            let imm = if elf.big {
                fd.to_be_bytes()
            } else {
                fd.to_le_bytes()
            };
            insn[4..8].copy_from_slice(&imm); // low half: the map fd
            insn[12..16].fill(0); // high half of the 64-bit immediate
        }
    }
    Ok(insns)
}

/// `(dst_reg, src_reg)` of an instruction's register byte. `struct bpf_insn` declares
/// `dst_reg:4, src_reg:4`, and C bit-fields fill from the low bits on little-endian
/// targets, from the high bits on big-endian ones.
pub fn regs(byte: u8, big: bool) -> (u8, u8) {
    match big {
        false => (byte & 0xf, byte >> 4),
        true => (byte >> 4, byte & 0xf),
    }
}

pub fn with_regs(dst: u8, src: u8, big: bool) -> u8 {
    match big {
        false => src << 4 | dst,
        true => dst << 4 | src,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static EL: &[u8] = include_bytes!("../../bpf/ksocks.bpfel.o");
    static EB: &[u8] = include_bytes!("../../bpf/ksocks.bpfeb.o");
    const PARSER: &str = "sk_skb/stream_parser";
    const VERDICT: &str = "sk_skb/stream_verdict";
    const FAKE_FDS: [(&str, i32); 3] = [("redirect", 100), ("hook", 101), ("counters", 102)];

    fn fake_fd(name: &str) -> Option<i32> {
        FAKE_FDS.iter().find(|(n, _)| *n == name).map(|(_, fd)| *fd)
    }

    /// (code, dst, src, off, imm) of each instruction.
    fn decode(insns: &[u8], big: bool) -> Vec<(u8, u8, u8, i16, i32)> {
        let off = |b: [u8; 2]| {
            if big {
                i16::from_be_bytes(b)
            } else {
                i16::from_le_bytes(b)
            }
        };
        let imm = |b: [u8; 4]| {
            if big {
                i32::from_be_bytes(b)
            } else {
                i32::from_le_bytes(b)
            }
        };
        insns
            .chunks(8)
            .map(|i| {
                let (dst, src) = regs(i[1], big);
                (
                    i[0],
                    dst,
                    src,
                    off([i[2], i[3]]),
                    imm([i[4], i[5], i[6], i[7]]),
                )
            })
            .collect()
    }

    /// Both committed objects parse, in their byte order, with the sections we need; a
    /// truncated file is an error.
    #[test]
    fn parses_both_objects() {
        for (data, big) in [(EL, false), (EB, true)] {
            let elf = Elf::parse(data).unwrap();
            assert_eq!(elf.big, big);
            assert_eq!(elf.license().unwrap().to_str().unwrap(), "Dual MIT/GPL");
            for section in [PARSER, VERDICT, "maps"] {
                elf.section(section).unwrap();
            }
        }
        assert!(Elf::parse(&EL[..40]).is_err());
        assert!(Elf::parse(&EL[..EL.len() - 100]).is_err());
    }

    /// Relocation turns exactly the two map loads into BPF_PSEUDO_MAP_FD loads of the right
    /// fds, and decodes identically from the little- and big-endian objects.
    #[test]
    fn relocation_against_both_objects() {
        let mut decoded = Vec::new();
        for (data, big) in [(EL, false), (EB, true)] {
            let elf = Elf::parse(data).unwrap();
            let parser = relocate(&elf, PARSER, &fake_fd).unwrap();
            assert_eq!(
                parser,
                elf.bytes(elf.section(PARSER).unwrap().1.offset, parser.len())
                    .unwrap()
            );
            let verdict = decode(&relocate(&elf, VERDICT, &fake_fd).unwrap(), big);
            // The first instruction saves the context: r7 = r1 (BPF_ALU64|BPF_MOV|BPF_X).
            assert_eq!(verdict[0], (0xbf, 7, 1, 0, 0));
            let loads: Vec<_> = verdict.iter().filter(|i| i.0 == BPF_LD_IMM64).collect();
            assert_eq!(loads.len(), 2);
            // bpf_sk_redirect_hash(skb, &redirect, ..) loads into r2, the lookup into r1.
            assert_eq!(*loads[0], (BPF_LD_IMM64, 2, bpf::BPF_PSEUDO_MAP_FD, 0, 100));
            assert_eq!(*loads[1], (BPF_LD_IMM64, 1, bpf::BPF_PSEUDO_MAP_FD, 0, 102));
            decoded.push((parser.len(), verdict));
        }
        assert_eq!(decoded[0], decoded[1]);
        let elf = Elf::parse(EL).unwrap();
        assert!(relocate(&elf, VERDICT, &|_| None).is_err());
    }

    /// The register nibbles swap with the byte order.
    #[test]
    fn register_nibbles() {
        assert_eq!(regs(0x17, false), (7, 1));
        assert_eq!(regs(0x71, true), (7, 1));
        for big in [false, true] {
            assert_eq!(regs(with_regs(3, 1, big), big), (3, 1));
        }
    }
}
