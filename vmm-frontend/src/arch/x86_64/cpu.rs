//! vCPU state for the Linux 64-bit boot protocol: CPUID, MSRs, long mode with an identity
//! map, the boot registers, the FPU and the local APIC's LINT pins.

// Register and bit-field code: truncating casts here split or narrow register values to
// their architectural widths on purpose (every value is masked or range-checked first).
#![allow(clippy::cast_possible_truncation)]

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};

use super::layout::*;

/// Failure to set up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A KVM vCPU ioctl failed.
    #[error("KVM {0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Building the MSR list failed.
    #[error("cannot build the MSR list")]
    Msrs,
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Builds a GDT entry from flags, base and limit (the layout of the Intel SDM 3.4.5).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code (0x08), data (0x10), TSS (0x18).
pub const fn gdt() -> [u64; 4] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// Decodes a GDT entry into a KVM segment with the given table index.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granular = (entry >> 55) & 1 == 1;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if granular {
            (limit << 12) | 0xfff
        } else {
            limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular.into(),
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from((entry >> 47) & 1 == 0),
        padding: 0,
    }
}

/// Patches the host-supported CPUID for vCPU `id` of `count`.
pub fn patch_cpuid(cpuid: &mut CpuId, id: u8, count: u8) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // Initial APIC ID and logical processor count; hypervisor present.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx |= 1 << 31;
            }
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
}

/// Sets CPUID, MSRs, registers, FPU and LAPIC of a vCPU to start the kernel at `entry`.
pub fn configure(kvm: &Kvm, vcpu: &VcpuFd, id: u8, count: u8, entry: u64) -> Result<(), CpuError> {
    let mut cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| CpuError::Kvm("GET_SUPPORTED_CPUID", e))?;
    patch_cpuid(&mut cpuid, id, count);
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| CpuError::Kvm("SET_CPUID2", e))?;

    let msrs = boot_msrs()?;
    let set = vcpu
        .set_msrs(&msrs)
        .map_err(|e| CpuError::Kvm("SET_MSRS", e))?;
    if set != msrs.as_slice().len() {
        log::debug!(
            "vcpu{id}: KVM took {set} of {} boot MSRs",
            msrs.as_slice().len()
        );
    }

    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| CpuError::Kvm("GET_SREGS", e))?;
    long_mode_sregs(&mut sregs);
    vcpu.set_sregs(&sregs)
        .map_err(|e| CpuError::Kvm("SET_SREGS", e))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| CpuError::Kvm("SET_REGS", e))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| CpuError::Kvm("SET_FPU", e))?;

    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| CpuError::Kvm("GET_LAPIC", e))?;
    set_lint(&mut lapic.regs, 0x350, 0x7); // LINT0: ExtINT
    set_lint(&mut lapic.regs, 0x360, 0x4); // LINT1: NMI
    vcpu.set_lapic(&lapic)
        .map_err(|e| CpuError::Kvm("SET_LAPIC", e))?;
    Ok(())
}

fn set_lint(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let Some(bytes) = regs.get_mut(offset..offset + 4) else {
        return;
    };
    let mut raw = [0u8; 4];
    for (r, b) in raw.iter_mut().zip(bytes.iter()) {
        *r = *b as u8;
    }
    let v = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
    for (b, r) in bytes.iter_mut().zip(v.to_le_bytes()) {
        *b = r as std::os::raw::c_char;
    }
}

/// Long mode with the identity map of `write_page_tables_and_gdt`.
pub fn long_mode_sregs(sregs: &mut kvm_sregs) {
    let gdt = gdt();
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
}

fn boot_msrs() -> Result<Msrs, CpuError> {
    let entry = |index: u32, data: u64| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    Msrs::from_entries(&[
        entry(0x174, 0),               // IA32_SYSENTER_CS
        entry(0x175, 0),               // IA32_SYSENTER_ESP
        entry(0x176, 0),               // IA32_SYSENTER_EIP
        entry(0xc000_0081, 0),         // STAR
        entry(0xc000_0082, 0),         // LSTAR
        entry(0xc000_0083, 0),         // CSTAR
        entry(0xc000_0102, 0),         // KERNEL_GS_BASE
        entry(0xc000_0084, 0),         // SYSCALL_MASK
        entry(0x10, 0),                // IA32_TSC
        entry(0x1a0, 1),               // IA32_MISC_ENABLE: fast strings
        entry(0x2ff, (1 << 11) | 0x6), // MTRRdefType: enabled, write-back
    ])
    .map_err(|_| CpuError::Msrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode() {
        let g = gdt();
        let cs = segment_from_gdt(g[1], 1);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.present, cs.s, cs.type_),
            (8, 1, 0, 1, 1, 0xb)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(g[2], 2);
        assert_eq!((ds.selector, ds.l, ds.db, ds.type_), (0x10, 0, 1, 3));
        let tr = segment_from_gdt(g[3], 3);
        assert_eq!((tr.selector, tr.s, tr.type_), (0x18, 0, 0xb));
        assert_eq!(segment_from_gdt(g[0], 0).unusable, 1);
    }

    #[test]
    fn long_mode() {
        let mut s = kvm_sregs::default();
        long_mode_sregs(&mut s);
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
    }

    #[test]
    fn cpuid_gets_apic_id() {
        let mut c = CpuId::new(2).expect("cpuid");
        c.as_mut_slice()[0].function = 1;
        c.as_mut_slice()[0].ebx = 0xdead_0800;
        c.as_mut_slice()[1].function = 0xb;
        patch_cpuid(&mut c, 3, 4);
        assert_eq!(c.as_slice()[0].ebx, 0x0304_0800);
        assert_ne!(c.as_slice()[0].ecx & (1 << 31), 0);
        assert_eq!(c.as_slice()[1].edx, 3);
    }

    #[test]
    fn lint_modes() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[0x351] = 0x7f;
        set_lint(&mut regs, 0x350, 7);
        assert_eq!(regs[0x351] as u8, 0x7f & !0x7 | 0x7);
        set_lint(&mut regs, 0x360, 4);
        assert_eq!(regs[0x361] as u8, 4);
    }
}
