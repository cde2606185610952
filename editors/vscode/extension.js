// The Perfusion concepts extension: starts `perfusion lsp` (the project's language server,
// docs/editors.md) over stdio for documents of language `perfusion` (*.concept). Plain
// CommonJS for VS Code's extension host: no build step. Highlighting is the TextMate grammar
// in syntaxes/, which needs none of this.
"use strict";

const path = require("path");
const vscode = require("vscode");
const { LanguageClient, TransportKind } = require("vscode-languageclient/node");

/** @type {LanguageClient | undefined} */
let client;

/** The server command from `perfusion.server.path`, resolved against the workspace. */
function serverCommand() {
  const setting = vscode.workspace.getConfiguration("perfusion").get("server.path");
  let command = typeof setting === "string" && setting.trim() ? setting.trim() : "perfusion";
  const folders = vscode.workspace.workspaceFolders;
  const root = folders && folders.length > 0 ? folders[0].uri.fsPath : undefined;
  if (root) {
    command = command.replace(/\$\{workspaceFolder\}/g, root);
    // A bare name ("perfusion") is looked up on PATH; a relative path is the workspace's.
    if (!path.isAbsolute(command) && /[\\/]/.test(command)) command = path.join(root, command);
  }
  return command;
}

async function startClient() {
  const command = serverCommand();
  /** @type {import("vscode-languageclient/node").ServerOptions} */
  const serverOptions = { command, args: ["lsp"], transport: TransportKind.stdio };
  /** @type {import("vscode-languageclient/node").LanguageClientOptions} */
  const clientOptions = {
    documentSelector: [
      { scheme: "file", language: "perfusion" },
      { scheme: "untitled", language: "perfusion" },
    ],
  };
  client = new LanguageClient("perfusion", "Perfusion language server", serverOptions,
                              clientOptions);
  try {
    await client.start();
  } catch (error) {
    const reason = error instanceof Error ? error.message : String(error);
    client = undefined;
    void vscode.window.showErrorMessage(
      `Perfusion: could not start the language server \`${command} lsp\` (${reason}). ` +
      "Install it with `pip install -e '.[lsp]'` and set `perfusion.server.path` " +
      "(for example `.venv/bin/perfusion`). Highlighting works without it.");
  }
}

async function stopClient() {
  const running = client;
  client = undefined;
  if (running) await running.stop();
}

/** @param {vscode.ExtensionContext} context */
async function activate(context) {
  context.subscriptions.push(
    vscode.commands.registerCommand("perfusion.restartServer", async () => {
      await stopClient();
      await startClient();
    }),
    vscode.workspace.onDidChangeConfiguration(async (event) => {
      if (event.affectsConfiguration("perfusion.server.path")) {
        await stopClient();
        await startClient();
      }
    }),
  );
  await startClient();
}

function deactivate() {
  return stopClient();
}

module.exports = { activate, deactivate };
