//! QUIC transport between the nodes of one cluster: one quinn endpoint per node, mTLS against the
//! cluster's CA, and length-prefixed, versioned frames. (Being written.)
