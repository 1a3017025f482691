"""Training loops that users launch: RL (`rl.driver.rl`), with DPO and SFT to follow."""
