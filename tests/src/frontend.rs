//! An in-test vhost-user frontend: memfd guest memory, virtqueues a test drives by hand,
//! and the vhost-user control sequence, to exercise a daemon over its real socket.
