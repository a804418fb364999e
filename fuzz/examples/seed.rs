//! Writes the seed corpora: a few well-formed requests per target, into `corpus/<target>/`.
//!
//! `cargo +nightly run --example seed` from `fuzz/` (or `cargo xtask fuzz --seed`).
//! Each seed is also run through its target once, so a seed that crashes fails here.

use std::path::Path;

use vhost_devices_fuzz::{targets, Builder};

const VERSION_1: u64 = 1 << 32;

fn le16(v: u16) -> [u8; 2] {
    v.to_le_bytes()
}

// ---- blk ------------------------------------------------------------------------------

fn blk_header(t: u32, sector: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&t.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

fn blk() -> Seeds {
    const IN: u32 = 0;
    const OUT: u32 = 1;
    const FLUSH: u32 = 4;
    const GET_ID: u32 = 8;
    const DISCARD: u32 = 11;
    const WRITE_ZEROES: u32 = 13;
    let mut seeds = Vec::new();
    for (name, flags) in [
        ("sync", 0u64),
        ("uring", 2),
        ("sync-eventidx-4k", 4 | 8 | 16),
    ] {
        let mut b = Builder::new(flags);
        let h = b.data(&blk_header(OUT, 8));
        let d = b.data(&[0xa5; 4096]);
        let s = b.space(1);
        b.chain(0, &[(h, 16, false), (d, 4096, false), (s, 1, true)]);
        let h = b.data(&blk_header(IN, 8));
        let d = b.space(4096);
        let s = b.space(1);
        b.chain(0, &[(h, 16, false), (d, 4096, true), (s, 1, true)]);
        let h = b.data(&blk_header(FLUSH, 0));
        let s = b.space(1);
        b.chain(0, &[(h, 16, false), (s, 1, true)]);
        let h = b.data(&blk_header(GET_ID, 0));
        let d = b.space(20);
        let s = b.space(1);
        b.chain(0, &[(h, 16, false), (d, 20, true), (s, 1, true)]);
        for (t, unmap) in [(DISCARD, 0u32), (WRITE_ZEROES, 1)] {
            let h = b.data(&blk_header(t, 0));
            let mut seg = Vec::new();
            seg.extend_from_slice(&16u64.to_le_bytes());
            seg.extend_from_slice(&8u32.to_le_bytes());
            seg.extend_from_slice(&unmap.to_le_bytes());
            let r = b.data(&seg);
            let s = b.space(1);
            b.chain(0, &[(h, 16, false), (r, 16, false), (s, 1, true)]);
        }
        seeds.push((name, b.finish()));
    }
    // A read split over several descriptors, one of them across the region boundary.
    let mut b = Builder::new(0);
    let h = b.data(&blk_header(IN, 0));
    let s = b.space(1);
    b.chain(
        0,
        &[
            (h, 16, false),
            (0x7f00, 0x200, true),
            (0x9000, 0x200, true),
            (s, 1, true),
        ],
    );
    seeds.push(("split", b.finish()));
    seeds
}

// ---- net ------------------------------------------------------------------------------

fn net_frame(gso_type: u8, payload: usize) -> Vec<u8> {
    // virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
    // num_buffers.
    let mut f = vec![0, gso_type];
    f.extend_from_slice(&le16(54));
    f.extend_from_slice(&le16(if gso_type != 0 { 1448 } else { 0 }));
    f.extend_from_slice(&le16(0));
    f.extend_from_slice(&le16(0));
    f.extend_from_slice(&le16(0));
    // Ethernet: broadcast destination, a local source, IPv4.
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend(std::iter::repeat_n(0x45u8, payload));
    f
}

fn net() -> Seeds {
    const HOST_TSO4: u64 = 1 << 11;
    const MRG_RXBUF: u64 = 1 << 15;
    let mut seeds = Vec::new();
    let mut b = Builder::new(VERSION_1 | (1500 << 40));
    let f = net_frame(0, 100);
    let a = b.data(&f);
    b.chain(0, &[(a, f.len() as u32, false)]);
    // Header and frame in separate descriptors, then a zero-length one.
    let f = net_frame(0, 200);
    let a = b.data(&f);
    b.chain(
        0,
        &[
            (a, 12, false),
            (a + 12, f.len() as u32 - 12, false),
            (a, 0, false),
        ],
    );
    seeds.push(("mtu1500", b.finish()));
    let mut b = Builder::new(VERSION_1 | HOST_TSO4 | MRG_RXBUF);
    let f = net_frame(1, 3000);
    let a = b.data(&f);
    b.chain(0, &[(a, f.len() as u32, false)]);
    seeds.push(("tso4", b.finish()));
    // A legacy 10-byte header (no VERSION_1, no MRG_RXBUF) and a tap that refuses.
    let mut b = Builder::new(1 << 56);
    let f = net_frame(0, 64);
    let a = b.data(&f[2..]);
    b.chain(0, &[(a, f.len() as u32 - 2, false)]);
    seeds.push(("legacy-tap-error", b.finish()));
    seeds
}

// ---- vsock ----------------------------------------------------------------------------

fn vsock_header(op: u16, dst_port: u32, len: u32, t: u16) -> Vec<u8> {
    let mut h = Vec::with_capacity(44);
    h.extend_from_slice(&targets::VSOCK_CID.to_le_bytes());
    h.extend_from_slice(&2u64.to_le_bytes());
    h.extend_from_slice(&5000u32.to_le_bytes());
    h.extend_from_slice(&dst_port.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&t.to_le_bytes());
    h.extend_from_slice(&op.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&65536u32.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h
}

fn vsock() -> Seeds {
    const REQUEST: u16 = 1;
    const RST: u16 = 3;
    const SHUTDOWN: u16 = 4;
    const RW: u16 = 5;
    const CREDIT_UPDATE: u16 = 6;
    const CREDIT_REQUEST: u16 = 7;
    const SEQPACKET: u64 = 1 << 1;
    let port = targets::VSOCK_LISTENING_PORT;
    let mut seeds = Vec::new();
    for (name, flags, t) in [
        ("stream", VERSION_1, 1u16),
        ("seqpacket-eventidx", VERSION_1 | SEQPACKET | (1 << 40), 2),
    ] {
        let mut b = Builder::new(flags);
        for _ in 0..4 {
            let h = b.space(44);
            let p = b.space(256);
            b.chain(0, &[(h, 44, true), (p, 256, true)]);
        }
        let h = b.data(&vsock_header(REQUEST, port, 0, t));
        b.chain(1, &[(h, 44, false)]);
        let h = b.data(&vsock_header(RW, port, 5, t));
        let p = b.data(b"hello");
        b.chain(1, &[(h, 44, false), (p, 5, false)]);
        let mut hp = vsock_header(RW, port, 3, t);
        hp.extend_from_slice(b"abc");
        let h = b.data(&hp);
        b.chain(1, &[(h, 47, false)]);
        let h = b.data(&vsock_header(CREDIT_REQUEST, port, 0, t));
        b.chain(1, &[(h, 44, false)]);
        let h = b.data(&vsock_header(CREDIT_UPDATE, port, 0, t));
        b.chain(1, &[(h, 44, false)]);
        let h = b.data(&vsock_header(SHUTDOWN, port, 0, t));
        b.chain(1, &[(h, 44, false)]);
        let h = b.data(&vsock_header(RST, port, 0, t));
        b.chain(1, &[(h, 44, false)]);
        seeds.push((name, b.finish()));
    }
    // A connection to a port nobody listens on: the guest gets a reset.
    let mut b = Builder::new(VERSION_1);
    let h = b.space(44);
    b.chain(0, &[(h, 44, true)]);
    let h = b.data(&vsock_header(REQUEST, 9999, 0, 1));
    b.chain(1, &[(h, 44, false)]);
    seeds.push(("refused", b.finish()));
    seeds
}

// ---- console --------------------------------------------------------------------------

fn control(id: u32, event: u16, value: u16) -> Vec<u8> {
    let mut m = id.to_le_bytes().to_vec();
    m.extend_from_slice(&le16(event));
    m.extend_from_slice(&le16(value));
    m
}

fn console() -> Seeds {
    const MULTIPORT: u64 = 1 << 1;
    const DEVICE_READY: u16 = 0;
    const PORT_READY: u16 = 3;
    const PORT_OPEN: u16 = 6;
    let mut seeds = Vec::new();
    for (name, flags) in [
        ("multiport", VERSION_1 | MULTIPORT),
        (
            "multiport-eventidx-config",
            VERSION_1 | MULTIPORT | (1 << 40) | (8 << 48) | (4 << 56),
        ),
    ] {
        let mut b = Builder::new(flags);
        // Receive buffers: port 0, control, port 1.
        for q in [0usize, 2, 2, 2, 2, 4] {
            let a = b.space(64);
            b.chain(q, &[(a, 64, true)]);
        }
        for m in [
            control(0, DEVICE_READY, 1),
            control(0, PORT_READY, 1),
            control(1, PORT_READY, 1),
            control(0, PORT_OPEN, 1),
            control(1, PORT_OPEN, 0),
        ] {
            let a = b.data(&m);
            b.chain(3, &[(a, 8, false)]);
        }
        let a = b.data(b"guest says hello\n");
        b.chain(1, &[(a, 17, false)]);
        let a = b.data(b"port one\n");
        b.chain(5, &[(a, 9, false)]);
        seeds.push((name, b.finish()));
    }
    // One port without MULTIPORT: only queues 0 and 1 exist for the driver.
    let mut b = Builder::new(VERSION_1);
    let a = b.space(64);
    b.chain(0, &[(a, 64, true)]);
    let a = b.data(b"single\n");
    b.chain(1, &[(a, 7, false)]);
    seeds.push(("single-port", b.finish()));
    seeds
}

/// Named seed inputs of one target.
type Seeds = Vec<(&'static str, Vec<u8>)>;

/// A target: its name, its seeds, and the function that runs one input.
type Target = (&'static str, Seeds, fn(&[u8]));

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let all: [Target; 4] = [
        ("blk_request", blk(), targets::blk),
        ("net_tx", net(), targets::net_tx),
        ("vsock_tx", vsock(), targets::vsock_tx),
        ("console_control", console(), targets::console_control),
    ];
    for (target, seeds, run) in all {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus directory");
        for (name, input) in seeds {
            run(&input);
            let path = dir.join(format!("seed-{name}"));
            std::fs::write(&path, &input).expect("seed written");
            println!("{} ({} bytes)", path.display(), input.len());
        }
    }
}
