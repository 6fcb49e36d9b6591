"""The supervisor: the loop that owns all state and side effects (loop), one CoreDNS slot per instance with
its table of allowed transitions (slot, states), the reload protocol (reload), the budgeted shutdown and
handover (shutdown), its clocks (timing) and the seams it drives (seams)."""
