//! The workspace's test harness.
//!
//! - [`frontend`]: a vhost-user frontend written in the test, driving a daemon's queues
//!   over its real socket in memfd-backed memory.
//! - guest launchers: a real Linux guest under QEMU (TCG or KVM) or under `vmm-frontend`
//!   (nested KVM), with vhost-user devices attached, running a command and returning its
//!   output and exit status.

pub mod frontend;
