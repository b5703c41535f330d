//! Building and pushing lazyblob images (placeholder replaced below).
