#!/usr/bin/env node
// Compiles the Solidity sources next to this file with the locally installed solc (solcjs)
// and writes <Contract>.json = {contractName, abi, bytecode, compiler} beside each source.
// Usage: npm run compile-contracts
"use strict";

const fs = require("fs");
const path = require("path");
const solc = require("solc");

const DIR = __dirname;
const SOURCES = ["TestToken.sol", "Portal.sol"];
const EVM_VERSION = "cancun";

const input = {
  language: "Solidity",
  sources: Object.fromEntries(
    SOURCES.map((file) => [file, { content: fs.readFileSync(path.join(DIR, file), "utf8") }]),
  ),
  settings: {
    optimizer: { enabled: true, runs: 200 },
    evmVersion: EVM_VERSION,
    outputSelection: { "*": { "*": ["abi", "evm.bytecode.object"] } },
  },
};

// No import callback: the contracts are self-contained and compile offline.
const output = JSON.parse(solc.compile(JSON.stringify(input)));
const messages = output.errors || [];
for (const m of messages) {
  (m.severity === "error" ? console.error : console.warn)(m.formattedMessage || m.message);
}
if (messages.some((m) => m.severity === "error")) {
  process.exit(1);
}

const compiler = solc.version();
for (const file of SOURCES) {
  const contractName = path.basename(file, ".sol");
  const contract = output.contracts?.[file]?.[contractName];
  if (!contract || !contract.evm.bytecode.object) {
    console.error(`${file}: no bytecode for contract ${contractName}`);
    process.exit(1);
  }
  const artifact = {
    contractName,
    abi: contract.abi,
    bytecode: "0x" + contract.evm.bytecode.object,
    compiler,
  };
  const out = path.join(DIR, `${contractName}.json`);
  fs.writeFileSync(out, JSON.stringify(artifact, null, 2) + "\n");
  console.log(`wrote ${path.relative(process.cwd(), out)} (${contract.evm.bytecode.object.length / 2} bytes)`);
}
