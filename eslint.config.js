// ESLint for the dashboard's JavaScript: browser ES modules, no build step (`make check`).

import js from "@eslint/js";
import globals from "globals";

const DASHBOARD = ["api/dashboard/js/**/*.js"];

export default [
  // Other JavaScript in the tree (the venv's packages, generated reports) is not ours.
  { ignores: [".venv/", "test-artifacts/", "bench-results/", ".smartcover-demo/"] },
  { ...js.configs.recommended, files: DASHBOARD },
  {
    files: DASHBOARD,
    languageOptions: {
      ecmaVersion: 2022,
      sourceType: "module",
      globals: globals.browser,
    },
    linterOptions: {
      reportUnusedDisableDirectives: "error",
    },
    rules: {
      // Mistakes the recommended set lets through, common in code without a type checker.
      eqeqeq: ["error", "always", { null: "ignore" }],
      "no-implicit-globals": "error",
      "no-shadow": "error",
      "no-unused-vars": ["error", { args: "after-used", caughtErrors: "none" }],
      "no-var": "error",
      "prefer-const": "error",
    },
  },
  {
    // This file itself runs in Node.
    ...js.configs.recommended,
    files: ["eslint.config.js"],
    languageOptions: { globals: globals.node },
  },
];
