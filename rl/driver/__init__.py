"""Training loops that users launch: RL (`rl.driver.rl`), DPO (`rl.driver.dpo`) and SFT (`rl.driver.sft`)."""
