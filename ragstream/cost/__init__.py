"""Cost accounting: prices, the meter every paid call goes through, budgets and the accountant.

pricing     the price table in config/prices.toml
meter       what a paid provider calls before (admit an estimate) and after (record usage)
            each API call; the call's document, tenant and stage come from the runtime
budget      windows, limits and the throttle verdict (pure)
accountant  the `<prefix>-cost` consumer group: ledger, windows, throttle events
report      `ragstream cost`
"""
