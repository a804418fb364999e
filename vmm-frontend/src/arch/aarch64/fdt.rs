//! The flattened device tree the arm64 kernel boots from (`vm-fdt`).
//!
//! Nodes: `/memory`, `/cpus` (one node per vCPU, `enable-method = "psci"`), `/psci` (0.2+
//! through `hvc`: KVM implements PSCI itself once the vCPU has the PSCI_0_2 feature),
//! `/intc` (in-kernel GICv3, or GICv2), `/timer` (the architected timer's four PPIs),
//! `/apb-pclk` (the fixed clock the PL011 driver asks for), `/pl011@9000000` (the console,
//! `chosen/stdout-path`), one `/virtio_mmio@...` per device, and `/chosen` with
//! `bootargs` and the initramfs range.

use vm_fdt::{Error as FdtError, FdtWriter};

use super::layout;

/// Which in-kernel interrupt controller the VM got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GicVersion {
    /// GICv3 (distributor and redistributors).
    V3,
    /// GICv2 (distributor and CPU interface).
    V2,
}

/// What the device tree describes.
#[derive(Debug, Clone)]
pub struct FdtParams<'a> {
    /// vCPU count.
    pub cpus: u8,
    /// RAM bytes from [`layout::RAM_START`].
    pub memory: u64,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// Initramfs (start, length).
    pub initrd: Option<(u64, u64)>,
    /// Interrupt controller.
    pub gic: GicVersion,
    /// Virtio-mmio devices: (address, SPI).
    pub virtio: Vec<(u64, u32)>,
}

const PHANDLE_GIC: u32 = 1;
const PHANDLE_CLOCK: u32 = 2;
/// Interrupt specifier cells: type (0 = SPI, 1 = PPI), number, flags.
const GIC_SPI: u32 = 0;
const GIC_PPI: u32 = 1;
const IRQ_EDGE_RISING: u32 = 1;
const IRQ_LEVEL_LOW: u32 = 8;

/// Builds the device tree blob.
pub fn create(p: &FdtParams<'_>) -> Result<Vec<u8>, FdtError> {
    let mut f = FdtWriter::new()?;
    let root = f.begin_node("")?;
    f.property_string("compatible", "linux,dummy-virt")?;
    f.property_u32("#address-cells", 2)?;
    f.property_u32("#size-cells", 2)?;
    f.property_u32("interrupt-parent", PHANDLE_GIC)?;

    let chosen = f.begin_node("chosen")?;
    f.property_string("bootargs", p.cmdline)?;
    f.property_string("stdout-path", &format!("/pl011@{:x}", layout::UART))?;
    if let Some((start, len)) = p.initrd {
        f.property_u64("linux,initrd-start", start)?;
        f.property_u64("linux,initrd-end", start + len)?;
    }
    f.end_node(chosen)?;

    let memory = f.begin_node(&format!("memory@{:x}", layout::RAM_START))?;
    f.property_string("device_type", "memory")?;
    f.property_array_u64("reg", &[layout::RAM_START, p.memory])?;
    f.end_node(memory)?;

    let cpus = f.begin_node("cpus")?;
    f.property_u32("#address-cells", 1)?;
    f.property_u32("#size-cells", 0)?;
    for id in 0..p.cpus {
        let mpidr = u32::try_from(layout::mpidr(id)).unwrap_or(u32::MAX);
        let cpu = f.begin_node(&format!("cpu@{mpidr:x}"))?;
        f.property_string("device_type", "cpu")?;
        f.property_string("compatible", "arm,arm-v8")?;
        f.property_string("enable-method", "psci")?;
        f.property_u32("reg", mpidr)?;
        f.end_node(cpu)?;
    }
    f.end_node(cpus)?;

    let psci = f.begin_node("psci")?;
    f.property_string_list(
        "compatible",
        vec!["arm,psci-1.0".into(), "arm,psci-0.2".into()],
    )?;
    f.property_string("method", "hvc")?;
    f.end_node(psci)?;

    let intc = f.begin_node(&format!("intc@{:x}", layout::GIC_DIST))?;
    match p.gic {
        GicVersion::V3 => {
            f.property_string("compatible", "arm,gic-v3")?;
            f.property_array_u64(
                "reg",
                &[
                    layout::GIC_DIST,
                    layout::GIC_DIST_SIZE,
                    layout::GIC_REDIST,
                    layout::GIC_REDIST_SIZE * u64::from(p.cpus),
                ],
            )?;
        }
        GicVersion::V2 => {
            f.property_string("compatible", "arm,cortex-a15-gic")?;
            f.property_array_u64(
                "reg",
                &[
                    layout::GIC_DIST,
                    layout::GIC_DIST_SIZE,
                    layout::GIC_V2_CPU,
                    layout::GIC_V2_CPU_SIZE,
                ],
            )?;
        }
    }
    f.property_u32("#interrupt-cells", 3)?;
    f.property_null("interrupt-controller")?;
    f.property_u32("#address-cells", 2)?;
    f.property_u32("#size-cells", 2)?;
    f.property_phandle(PHANDLE_GIC)?;
    f.end_node(intc)?;

    // Secure physical, non-secure physical, virtual and hypervisor timers (PPIs 13, 14,
    // 11, 10). GICv2 wants the CPU mask in the flags.
    let cpu_mask = match p.gic {
        GicVersion::V3 => 0,
        GicVersion::V2 => ((1u32 << p.cpus.min(8)) - 1) << 8,
    };
    let timer = f.begin_node("timer")?;
    f.property_string("compatible", "arm,armv8-timer")?;
    let mut irqs = Vec::new();
    for ppi in [13, 14, 11, 10] {
        irqs.extend_from_slice(&[GIC_PPI, ppi, IRQ_LEVEL_LOW | cpu_mask]);
    }
    f.property_array_u32("interrupts", &irqs)?;
    f.property_null("always-on")?;
    f.end_node(timer)?;

    let clock = f.begin_node("apb-pclk")?;
    f.property_string("compatible", "fixed-clock")?;
    f.property_u32("#clock-cells", 0)?;
    f.property_u32("clock-frequency", 24_000_000)?;
    f.property_string("clock-output-names", "clk24mhz")?;
    f.property_phandle(PHANDLE_CLOCK)?;
    f.end_node(clock)?;

    let uart = f.begin_node(&format!("pl011@{:x}", layout::UART))?;
    f.property_string_list(
        "compatible",
        vec!["arm,pl011".into(), "arm,primecell".into()],
    )?;
    f.property_array_u64("reg", &[layout::UART, layout::UART_SIZE])?;
    // Edge: the UART's interrupt is an irqfd, which pulses the line.
    f.property_array_u32("interrupts", &[GIC_SPI, layout::UART_SPI, IRQ_EDGE_RISING])?;
    f.property_array_u32("clocks", &[PHANDLE_CLOCK, PHANDLE_CLOCK])?;
    f.property_string_list("clock-names", vec!["uartclk".into(), "apb_pclk".into()])?;
    f.end_node(uart)?;

    for &(addr, spi) in &p.virtio {
        let v = f.begin_node(&format!("virtio_mmio@{addr:x}"))?;
        f.property_string("compatible", "virtio,mmio")?;
        f.property_array_u64("reg", &[addr, layout::VIRTIO_MMIO_SIZE])?;
        f.property_array_u32("interrupts", &[GIC_SPI, spi, IRQ_EDGE_RISING])?;
        f.property_null("dma-coherent")?;
        f.end_node(v)?;
    }
    f.end_node(root)?;
    f.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A minimal FDT reader: every node's path with its properties.
    fn parse(blob: &[u8]) -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
        let be32 = |o: usize| u32::from_be_bytes(blob[o..o + 4].try_into().expect("4 bytes"));
        assert_eq!(be32(0), 0xd00d_feed, "magic");
        assert_eq!(be32(4) as usize, blob.len(), "totalsize");
        let structs = be32(8) as usize;
        let strings = be32(12) as usize;
        let mut nodes = BTreeMap::new();
        let mut path: Vec<String> = Vec::new();
        let mut o = structs;
        loop {
            let token = be32(o);
            o += 4;
            match token {
                1 => {
                    let end = o + blob[o..].iter().position(|&b| b == 0).expect("name");
                    let name = String::from_utf8(blob[o..end].to_vec()).expect("utf8");
                    o = (end + 1 + 3) & !3;
                    path.push(name);
                    nodes.insert(path.join("/"), BTreeMap::new());
                }
                2 => {
                    path.pop();
                }
                3 => {
                    let len = be32(o) as usize;
                    let nameoff = be32(o + 4) as usize;
                    o += 8;
                    let s = strings + nameoff;
                    let end = s + blob[s..].iter().position(|&b| b == 0).expect("prop");
                    let name = String::from_utf8(blob[s..end].to_vec()).expect("utf8");
                    let value = blob[o..o + len].to_vec();
                    o = (o + len + 3) & !3;
                    nodes
                        .get_mut(&path.join("/"))
                        .expect("node")
                        .insert(name, value);
                }
                4 => {}
                9 => break,
                t => panic!("bad token {t}"),
            }
        }
        nodes
    }

    fn cells(v: &[u8]) -> Vec<u32> {
        v.chunks(4)
            .map(|c| u32::from_be_bytes(c.try_into().expect("cell")))
            .collect()
    }

    fn params(gic: GicVersion) -> FdtParams<'static> {
        FdtParams {
            cpus: 2,
            memory: 512 << 20,
            cmdline: "console=ttyAMA0 panic=-1",
            initrd: Some((0x9f00_0000, 0x10_0000)),
            gic,
            virtio: vec![(0x0a00_0000, 16), (0x0a00_0200, 17)],
        }
    }

    #[test]
    fn gicv3_tree_has_every_node() {
        let blob = create(&params(GicVersion::V3)).expect("fdt");
        assert!(blob.len() as u64 <= layout::FDT_MAX_SIZE);
        let t = parse(&blob);
        let chosen = &t["/chosen"];
        assert_eq!(chosen["bootargs"], b"console=ttyAMA0 panic=-1\0");
        assert_eq!(chosen["stdout-path"], b"/pl011@9000000\0");
        assert_eq!(chosen["linux,initrd-start"], 0x9f00_0000u64.to_be_bytes());
        assert_eq!(chosen["linux,initrd-end"], 0x9f10_0000u64.to_be_bytes());
        let mem = &t["/memory@80000000"];
        assert_eq!(mem["device_type"], b"memory\0");
        assert_eq!(cells(&mem["reg"]), [0, 0x8000_0000, 0, 0x2000_0000]);
        for (node, reg) in [("/cpus/cpu@0", 0), ("/cpus/cpu@1", 1)] {
            assert_eq!(t[node]["enable-method"], b"psci\0");
            assert_eq!(cells(&t[node]["reg"]), [reg]);
        }
        assert!(!t.contains_key("/cpus/cpu@2"));
        assert_eq!(t["/psci"]["method"], b"hvc\0");
        assert!(t["/psci"]["compatible"]
            .windows(12)
            .any(|w| w == b"arm,psci-0.2"));
        let gic = &t["/intc@8000000"];
        assert_eq!(gic["compatible"], b"arm,gic-v3\0");
        assert_eq!(
            cells(&gic["reg"]),
            [0, 0x0800_0000, 0, 0x1_0000, 0, 0x080a_0000, 0, 0x4_0000]
        );
        assert!(gic.contains_key("interrupt-controller"));
        assert_eq!(cells(&gic["phandle"]), [PHANDLE_GIC]);
        assert_eq!(cells(&t[""]["interrupt-parent"]), [PHANDLE_GIC]);
        assert_eq!(
            cells(&t["/timer"]["interrupts"]),
            [1, 13, 8, 1, 14, 8, 1, 11, 8, 1, 10, 8]
        );
        let uart = &t["/pl011@9000000"];
        assert_eq!(cells(&uart["interrupts"]), [0, 1, 1]);
        assert_eq!(cells(&uart["clocks"]), [PHANDLE_CLOCK, PHANDLE_CLOCK]);
        assert_eq!(cells(&t["/apb-pclk"]["phandle"]), [PHANDLE_CLOCK]);
        let v1 = &t["/virtio_mmio@a000200"];
        assert_eq!(v1["compatible"], b"virtio,mmio\0");
        assert_eq!(cells(&v1["reg"]), [0, 0x0a00_0200, 0, 0x200]);
        assert_eq!(cells(&v1["interrupts"]), [0, 17, 1]);
        assert!(t.contains_key("/virtio_mmio@a000000"));
    }

    #[test]
    fn gicv2_tree_and_no_initrd() {
        let mut p = params(GicVersion::V2);
        p.initrd = None;
        p.virtio.clear();
        let t = parse(&create(&p).expect("fdt"));
        let gic = &t["/intc@8000000"];
        assert_eq!(gic["compatible"], b"arm,cortex-a15-gic\0");
        assert_eq!(
            cells(&gic["reg"]),
            [0, 0x0800_0000, 0, 0x1_0000, 0, 0x0801_0000, 0, 0x2000]
        );
        // Two CPUs: the PPI flags carry the CPU mask 0b11.
        assert_eq!(cells(&t["/timer"]["interrupts"])[2], 0x308);
        assert!(!t["/chosen"].contains_key("linux,initrd-start"));
        assert!(!t.keys().any(|k| k.contains("virtio")));
    }
}
