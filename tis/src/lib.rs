//! Hardware TPM driver (TIS / PTP FIFO / CRB). Built in a later issue.
